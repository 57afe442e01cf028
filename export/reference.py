"""The PyTorch side of export: HF's own code for what the split model must reproduce.

Runs in a child process (``python -m swapmoe_export.reference``), so that the exporting
process never imports torch: torch and transformers alone take ~350 MB of RSS. Only
validation needs it; export itself needs no torch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swapmoe_edge.core.errors import ExportError
from swapmoe_edge.core.keys import LayerKey

from . import ladder
from .checkpoint import CheckpointReader
from .quant import as_stored, quantize_nbits


@dataclass
class Reference:
    """The PyTorch model's teacher-forced run: logits, each block's input and output, encoder output."""

    logits: np.ndarray | None
    block_in: dict[LayerKey, np.ndarray]
    block_out: dict[LayerKey, np.ndarray]
    encoder_out: np.ndarray | None

    def to_npz(self) -> dict[str, np.ndarray]:
        z = {"logits": self.logits, "encoder_out": self.encoder_out}
        for tag, d in (("in", self.block_in), ("out", self.block_out)):
            z.update({f"{tag}.{k.stack}.{k.layer}": v for k, v in d.items()})
        return z

    @classmethod
    def from_npz(cls, z: dict[str, np.ndarray]) -> "Reference":
        ref = cls(z["logits"], {}, {}, z["encoder_out"])
        for name, v in z.items():
            if name.startswith(("in.", "out.")):
                tag, stack, layer = name.split(".")
                (ref.block_in if tag == "in" else ref.block_out)[LayerKey(stack, int(layer))] = v
        return ref


def bucket_table(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """HF's relative-position bucket for every r in [-max_distance, max_distance], by HF's own code
    (the reference for ``graphs.relative_position_buckets``, which export uses)."""
    import torch
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersAttention

    rel = torch.arange(-max_distance, max_distance + 1, dtype=torch.long)
    buckets = SwitchTransformersAttention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    return buckets.numpy().astype(np.int64)


# The dense Linear layers an int8/int4 artifact runs through MatMulNBits (all but experts and router).
_NBITS_LINEAR = re.compile(r"(\.(SelfAttention|EncDecAttention)\.[qkvo]|\.mlp\.w[io]|^lm_head)$")
_EXPERT_LINEAR = re.compile(r"\.mlp\.experts\.expert_\d+\.w[io]$")


def round_activations(x, block: int):
    """``x`` (a torch tensor) as MatMulNBits at accuracy_level 4 rounds its input: int8 per block of
    ``block`` along the last axis (quant.quantize_activations, in torch)."""
    import torch  # deferred: validation only

    k = x.shape[-1]
    pad = (-k) % block
    g = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block)
    s = g.abs().amax(dim=-1, keepdim=True) / torch.tensor(127, dtype=torch.float32)
    inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    return (torch.round(g * inv) * s).reshape(*x.shape[:-1], k + pad)[..., :k]


def _quantize_activations_hook(block: int):
    """A forward pre-hook: the Linear's input as MatMulNBits at accuracy_level 4 rounds it."""

    def hook(module, args):
        return (round_activations(args[0], block), *args[1:])

    return hook


def streamed_hf_forward(model_dir: Path, ids, mask, dec, round_to: str = "float32", expert_dtype: str | None = None,
                        dense_nbits: dict | None = None, expert_nbits: dict | None = None) -> Reference:
    """Teacher-forced logits of the HF model and each block's output.

    The model is built on the ``meta`` device; each module that owns weights gets them
    just before it runs and gives them back right after, so about one expert's weights
    are in memory at a time (plus embeddings and LM head).

    ``dense_nbits`` (an int8/int4 artifact's manifest entry): the dense Linear weights are the
    artifact's dequantised MatMulNBits blocks, and at accuracy_level 4 their inputs are rounded
    as the kernel rounds them, so the comparison stays one of float32 rounding. ``expert_nbits``
    (int4 experts' entry): at accuracy_level 4 the experts' inputs are rounded alike.
    """
    import torch
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = SwitchTransformersForConditionalGeneration(config)
    model.eval()
    reader = CheckpointReader(model_dir)

    loaded: dict[str, torch.Tensor] = {}  # tied names share one tensor, as in the real model

    def load(name: str) -> torch.Tensor:
        alias = {
            "encoder.embed_tokens.weight": ("shared.weight",),
            "decoder.embed_tokens.weight": ("shared.weight",),
            "shared.weight": ("encoder.embed_tokens.weight",),
            "lm_head.weight": ("shared.weight",) if config.tie_word_embeddings else (),
        }
        source = next((n for n in (name, *alias.get(name, ())) if reader.has(n)), name)
        nbits = dense_nbits is not None and _NBITS_LINEAR.search(name[: -len(".weight")]) is not None
        if source in loaded and not nbits:
            return loaded[source]
        arr = reader.get(source)
        if ".mlp.experts." in source:  # the expert weights the artifact runs ([out, in] here)
            arr = np.ascontiguousarray(as_stored(arr.T, expert_dtype or round_to).T)
        elif nbits:  # a MatMulNBits weight: [out, in] here, [K, N] = [in, out] there
            bits = dense_nbits.get("lm_head_bits", dense_nbits["bits"]) if name == "lm_head.weight" else dense_nbits["bits"]
            q, scale = quantize_nbits(np.ascontiguousarray(arr.T), bits, dense_nbits["block_size"])
            arr = np.ascontiguousarray(ladder.dequantize(q, scale, bits, arr.shape[1]).T)
        elif round_to == "float16":
            arr = arr.astype(np.float16).astype(np.float32)
        tensor = torch.from_numpy(arr)
        if ".block." not in source and not nbits:
            loaded[source] = tensor
        return tensor

    def assign(module, prefix: str, materialize: bool) -> None:
        for leaf, param in list(module._parameters.items()):
            if param is None:  # e.g. a Linear without bias
                continue
            value = load(prefix + leaf) if materialize else torch.empty_like(param, device="meta")
            module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)

    # Everything outside the blocks stays (embeddings, final norms, LM head).
    for pname, _ in list(model.named_parameters(remove_duplicate=False)):
        if ".block." in pname:
            continue
        owner = model.get_submodule(pname.rsplit(".", 1)[0])
        owner._parameters[pname.rsplit(".", 1)[-1]] = torch.nn.Parameter(load(pname), requires_grad=False)

    # Inside the blocks, each module that owns weights (Linear, LayerNorm, Embedding)
    # gets them just before it runs and gives them back right after: one expert at a time.
    for mname, module in model.named_modules():
        if ".block." in mname and any(p is not None for p in module._parameters.values()):
            module.register_forward_pre_hook(lambda mod, args, prefix=mname + ".": assign(mod, prefix, True))
            module.register_forward_hook(lambda mod, args, out: assign(mod, "", False))

    for nb, which in ((dense_nbits, _NBITS_LINEAR), (expert_nbits, _EXPERT_LINEAR)):
        if nb is not None and nb["accuracy_level"] == 4:
            for mname, module in model.named_modules():
                if which.search(mname):
                    module.register_forward_pre_hook(_quantize_activations_hook(nb["block_size"]))

    # What each block got and gave, so the split model can be checked block by block on
    # the same inputs (independent end-to-end runs drift apart in deep random models).
    ref = Reference(logits=None, block_in={}, block_out={}, encoder_out=None)

    def keep(store, key, t) -> None:
        store[key] = t.detach().numpy().copy()

    for stack_name in ("encoder", "decoder"):
        for i, block in enumerate(getattr(model, stack_name).block):
            key = LayerKey(stack_name, i)
            block.register_forward_pre_hook(
                lambda mod, args, kwargs, key=key: keep(ref.block_in, key, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True,
            )
            block.register_forward_hook(lambda mod, args, out, key=key: keep(ref.block_out, key, out[0]))
    model.encoder.register_forward_hook(lambda mod, args, out: setattr(ref, "encoder_out", out[0].detach().numpy().copy()))
    with torch.no_grad():
        ref.logits = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            decoder_input_ids=torch.from_numpy(dec),
        ).logits.numpy()
    reader.close()
    return ref




def _child(args: list[str], out: Path) -> dict[str, np.ndarray]:
    r = subprocess.run([sys.executable, "-m", "swapmoe_export.reference", *args, str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        raise ExportError(f"the PyTorch reference process failed:\n{r.stderr.strip()[-3000:]}")
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


# ``inprocess`` runs the PyTorch reference in this process: for a process that has torch loaded
# already and memory to spare (the test suite sets it; a child costs a fresh torch import).
IN_PROCESS_ENV = "SWAPMOE_EXPORT_REFERENCE"


def reference_forward_in_child(model_dir: Path, ids, mask, dec, round_to: str = "float32", expert_dtype: str | None = None,
                               dense_nbits: dict | None = None, expert_nbits: dict | None = None) -> Reference:
    """The PyTorch model's outputs, computed in a child process so that torch's memory never
    counts against the exporter's (unless ``$SWAPMOE_EXPORT_REFERENCE=inprocess``)."""
    if os.environ.get(IN_PROCESS_ENV) == "inprocess":
        return streamed_hf_forward(Path(model_dir), ids, mask, dec, round_to, expert_dtype or round_to, dense_nbits,
                                   expert_nbits)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, ids=ids, mask=mask, dec=dec)
        z = _child(["forward", str(model_dir), str(inputs), round_to, expert_dtype or round_to, json.dumps(dense_nbits),
                    json.dumps(expert_nbits)], Path(tmp) / "ref.npz")
    return Reference.from_npz(z)


def main(argv: list[str]) -> None:
    cmd, *rest = argv
    if cmd == "forward":
        model_dir, inputs, round_to, expert_dtype, dense_nbits, expert_nbits, out = rest
        with np.load(inputs) as z:
            ids, mask, dec = z["ids"], z["mask"], z["dec"]
        ref = streamed_hf_forward(Path(model_dir), ids, mask, dec, round_to, expert_dtype, json.loads(dense_nbits),
                                  json.loads(expert_nbits))
        np.savez(out, **ref.to_npz())
    else:
        raise SystemExit(f"unknown command {cmd!r}: {json.dumps(argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
