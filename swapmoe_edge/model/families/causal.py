"""Decoder-only top-k MoE models (Hugging Face ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``,
``Qwen3MoeForCausalLM``, ``OlmoeForCausalLM``): the split model in model/causal.py.

Each token goes to the top k of its router's softmax over all E experts, no token dropped,
the k gates renormalised where the model says so (``norm_topk_prob``; Mixtral always), and
the gated outputs summed in expert order, as transformers adds them. Generation pads prompts
on the left, runs the prompt on the first step and one token a step after it, through the
same greedy and beam searches as Switch (generate.py); the ids it returns exclude the prompt.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from swapmoe_edge.artifact.manifest import Manifest
from swapmoe_edge.core.errors import ArtifactError
from swapmoe_edge.model.causal import CausalModel, causal_config, pad_left
from swapmoe_edge.model.families import Family
from swapmoe_edge.model.generate import Decoding, Step, ban_repeated_ngrams, beam_steps, greedy_steps
from swapmoe_edge.model.moe import dispatch, route_topk, topk_router
from swapmoe_edge.model.sessions import DenseSessions
from swapmoe_edge.model.split import MoEFn, MoEHook

SUBGRAPHS = ("embed", "lm_head", "expert_kernel")
_TOUCH_ROWS = 4096


def build(manifest: Manifest, sessions: DenseSessions, moe: MoEFn, hook: MoEHook | None = None) -> CausalModel:
    return CausalModel(manifest, sessions, moe, hook)


def check(manifest: Manifest) -> None:
    """ArtifactError unless the manifest names what CausalModel runs: its decoder config, the
    embedding, the LM head, the expert kernel and a step graph in every layer."""
    c, m = causal_config(manifest), manifest.config
    for name, got, want in (("hidden_size", c.hidden_size, m.d_model), ("num_layers", c.num_layers, m.num_decoder_layers),
                            ("num_experts", c.num_experts, m.num_experts), ("moe_intermediate_size", c.moe_intermediate_size, m.d_ff),
                            ("vocab_size", c.vocab_size, m.vocab_size)):
        if got != want:
            raise ArtifactError(f"{manifest.root / 'manifest.json'}: extra.causal_config.{name} is {got}, the config block "
                                f"says {want}. Export the model again.")
    if not 1 <= c.top_k <= c.num_experts or c.num_heads % c.num_kv_heads:
        raise ArtifactError(f"{manifest.root / 'manifest.json'}: extra.causal_config has top-{c.top_k} of {c.num_experts} "
                            f"experts and {c.num_heads} heads over {c.num_kv_heads} key/value heads. Export the model again.")
    missing = [f"subgraph {n}" for n in SUBGRAPHS if n not in manifest.subgraphs]
    missing += [f"{layer.key.name} part step" for layer in manifest.layers if "step" not in layer.parts]
    if manifest.extra.get("expert_act") != "swiglu":
        missing.append("extra.expert_act 'swiglu'")
    if missing:
        raise ArtifactError(f"{manifest.root / 'manifest.json'} lacks what a decoder-only MoE model runs: "
                            f"{', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}. Export the model again.")


def exact_moe_topk(run_expert, k: int, norm_topk_prob: bool) -> MoEFn:
    """The exact top-k MoE with every expert available: ``run_expert(ExpertKey, x) -> y``."""

    def moe(layer, normed, logits, token_mask):
        r = route_topk(logits, k, norm_topk_prob=norm_topk_prob)
        return dispatch(r, normed, lambda e, x: run_expert(layer.experts[e], x))

    return moe


def bind(manifest: Manifest) -> Family:
    """The family with this model's k and gate rule in its router and exact MoE."""
    c = causal_config(manifest)
    return routed(c.top_k, c.norm_topk_prob)


def routed(k: int, norm: bool) -> Family:
    """The family with a router of ``k`` experts a token, gates renormalised when ``norm``
    (``bind`` gives a manifest's; a routing trace's replay gives the one it recorded)."""
    return Family(name="causal", kind="decoder-only", top_k=k, build=build, route=topk_router(k, norm),
                  exact_moe=lambda run_expert, capacity: exact_moe_topk(run_expert, k, norm), generate=generate,
                  embedding_files=embedding_files, touch_embeddings=touch_embeddings, envelope_pass=envelope_pass,
                  check=check)


def generate(model: CausalModel, rows: Sequence[Sequence[int]], decoding: Decoding,
             hook: MoEHook | None = None) -> Iterator[Step]:
    """Generate for ``rows`` (prompts): one ``Step`` per new token, greedy or beam.

    ``no_repeat_ngram_size``: greedy bans the n-grams of the whole row, left padding and prompt
    included, as HF does for a decoder-only model; beam search (generate.py's) bans those of the
    new tokens only."""
    c = model.cfg
    ids, mask = pad_left(rows, c.pad_token_id)  # [B, S]
    state = model.start(ids, mask)
    start = c.bos_token_id if c.bos_token_id is not None else c.pad_token_id
    common = dict(start_id=start, eos_id=c.eos_token_ids, pad_id=c.pad_token_id, max_new_tokens=decoding.max_new_tokens)
    if decoding.num_beams > 1:
        return beam_steps(_StepDecoder(model, hook), state, len(rows), num_beams=decoding.num_beams,
                          no_repeat_ngram_size=decoding.no_repeat_ngram_size, **common)
    decoder = _StepDecoder(model, hook, decoding.no_repeat_ngram_size, ids)
    return greedy_steps(decoder, state, len(rows), forced=decoding.forced, **common)


class _StepDecoder:
    """The model as the searches' step/reorder protocol (generate.StepDecoder); with ``ban`` (greedy
    only: nothing reorders its rows) it bans repeated n-grams over the prompt and the tokens fed."""

    def __init__(self, model: CausalModel, hook: MoEHook | None, ban: int = 0, prompt: np.ndarray | None = None):
        self.model, self.hook, self.ban = model, hook, ban
        self.history = prompt  # [B, S + t]: HF's input_ids, left padding included

    def step(self, state, next_ids: np.ndarray):
        first = state.prompt is not None  # the first step runs the prompt; next_ids is not a token yet
        logits, state = self.model.step(state, next_ids, hook=self.hook)  # [B, V]
        if self.ban:
            if not first:
                self.history = np.concatenate([self.history, next_ids.reshape(-1, 1)], axis=1)
            logits = ban_repeated_ngrams(self.history, logits, self.ban)
        return logits, state

    def reorder(self, state, index: np.ndarray):
        assert not self.ban, "a banning decoder keeps one history per row"
        return state.reorder(index)


def embedding_files(manifest: Manifest) -> set[str]:
    """The embedding table's files: read row by row as requests touch them, never read ahead."""
    sg = manifest.subgraphs["embed"]
    return {sg.file, sg.file + ".data"}


def touch_embeddings(model: CausalModel) -> None:
    """Look up every row of the embedding table, so that its mapped pages are resident."""
    v = model.cfg.vocab_size
    for start in range(0, v, _TOUCH_ROWS):
        ids = np.arange(start, min(start + _TOUCH_ROWS, v), dtype=np.int64)[None, :]
        model.sessions.run("embed", {"input_ids": ids})


def envelope_pass(model: CausalModel, tokens: int) -> None:
    """The largest pass a request of ``tokens`` prompt tokens makes: the prompt, then one step."""
    state = model.start(np.full((1, tokens), 2 % model.cfg.vocab_size, dtype=np.int64), np.ones((1, tokens), dtype=np.int64))
    _, state = model.step(state, np.zeros(1, dtype=np.int64))
    model.step(state, np.full(1, 2 % model.cfg.vocab_size, dtype=np.int64))


def _unbound(*args, **kwargs):
    raise ArtifactError("a decoder-only model's router depends on its manifest: use families.family_of(manifest)")


# Registered by name; family_of(manifest) hands out ``bind(manifest)``, whose router knows the model's k.
FAMILY = Family(name="causal", kind="decoder-only", top_k=1, build=build, route=_unbound, exact_moe=_unbound,
                generate=generate, embedding_files=embedding_files, touch_embeddings=touch_embeddings,
                envelope_pass=envelope_pass, check=check, bind=bind)
