"""The Switch Transformer family (Hugging Face ``SwitchTransformersForConditionalGeneration``).

An encoder-decoder whose sparse layers send each token to its top-1 expert, within the
expert capacity HF applies at inference (moe.py). The split model (split.py) runs it.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from swapmoe_edge.artifact.manifest import Manifest
from swapmoe_edge.core.errors import ArtifactError
from swapmoe_edge.model import encdec
from swapmoe_edge.model.families import Family
from swapmoe_edge.model.generate import Decoding, Step
from swapmoe_edge.model.moe import route
from swapmoe_edge.model.sessions import DenseSessions
from swapmoe_edge.model.split import MoEFn, MoEHook, SplitModel, full_moe

EMBEDDINGS = ("enc.embed", "dec.embed")
SUBGRAPHS = (*EMBEDDINGS, "enc.position_bias", "dec.position_bias", "enc.final_norm", "lm_head", "expert_kernel")
_TOUCH_ROWS = 4096  # embedding rows looked up per call when touching a table


def build(manifest: Manifest, sessions: DenseSessions, moe: MoEFn, hook: MoEHook | None = None) -> SplitModel:
    return SplitModel(manifest, sessions, moe, hook)


def check(manifest: Manifest) -> None:
    """ArtifactError unless the manifest names every subgraph the split model runs (split.py):
    schema 2's fused blocks or schema 1's separate parts, in every layer."""
    missing = [f"subgraph {n}" for n in SUBGRAPHS if n not in manifest.subgraphs]
    for layer in manifest.layers:
        ffn = "router" if layer.sparse else "ffn"
        if layer.key.stack == "encoder":
            need = ("block",) if "block" in layer.parts else ("attn", ffn)
        else:
            need = ("step", "cross_kv") if "step" in layer.parts else ("self_attn", "cross_attn", "cross_kv", ffn)
        missing += [f"{layer.key.name} part {role}" for role in need if role not in layer.parts]
    if missing:
        raise ArtifactError(f"{manifest.root / 'manifest.json'} lacks what a Switch Transformer runs: "
                            f"{', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}. Export the model again.")


def generate(model: SplitModel, rows: Sequence[Sequence[int]], decoding: Decoding,
             hook: MoEHook | None = None) -> Iterator[Step]:
    c = model.cfg
    return encdec.steps(model, rows, decoding, start_id=c.decoder_start_token_id, eos_id=c.eos_token_id,
                        pad_id=c.pad_token_id, hook=hook)


def embedding_files(manifest: Manifest) -> set[str]:
    """The embedding tables' files. ONNX Runtime maps them lazily and a request touches only the
    rows of its tokens (of 2 x 99 MB at switch-base size), so they are never read ahead."""
    return {f for sg in manifest.subgraphs.values() if sg.name.endswith(".embed") for f in (sg.file, sg.file + ".data")}


def touch_embeddings(model: SplitModel) -> None:
    """Look up every row of both embedding tables, so that their mapped pages are resident."""
    for name in EMBEDDINGS:
        for start in range(0, model.cfg.vocab_size, _TOUCH_ROWS):
            ids = np.arange(start, min(start + _TOUCH_ROWS, model.cfg.vocab_size), dtype=np.int64)[None, :]
            model.sessions.run(name, {"input_ids": ids})


def envelope_pass(model: SplitModel, tokens: int) -> None:
    """The largest pass a request of ``tokens`` source tokens makes: the encoder over one row of
    that length, then the first decoder step."""
    ids = np.full((1, tokens), 2, dtype=np.int64)
    mask = np.ones_like(ids)
    state = model.start_decoder(model.encode(ids, mask), mask)
    model.decode(np.full((1, 1), model.cfg.decoder_start_token_id, dtype=np.int64), state)


FAMILY = Family(name="switch", kind="encoder-decoder", top_k=1, build=build, route=route, exact_moe=full_moe,
                generate=generate, embedding_files=embedding_files, touch_embeddings=touch_embeddings,
                envelope_pass=envelope_pass, check=check)
