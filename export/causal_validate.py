"""Check an exported decoder-only MoE artifact against the PyTorch model, one layer at a time.

The reference is transformers' own decoder layer of the family, built for one layer at a time
with that layer's weights read from the checkpoint (rounded as the artifact stores them), so
that validating holds one layer's weights, not the model's. Checks, every mismatch reported
together (ValidationError), each against the float32 rounding bound of what it computes
(bounds.py):
- every expert's standalone subgraph against SwiGLU on the checkpoint's weights for it;
- block by block: each layer (its step graph and routed experts) on transformers' input to it,
  and the LM head, on a left-padded batch's real tokens;
- end to end: the split model alone against transformers' logits; a few tokens past the whole
  stack's bound while the blocks match are a routing decision flipped at a near tie (reported).

An int8/int4 dense artifact (manifest ``dense_nbits``) is checked as Switch's is: transformers
runs the artifact's dequantised MatMulNBits weights, their inputs rounded as the kernel rounds
them at accuracy level 4 (reference.py's hook); the loss against the float model is measured
separately (``quantisation_vs_float``, lossy). int4 experts at accuracy level 4 (manifest
``expert_nbits``) run in transformers with their inputs rounded alike (``rounded_experts``).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.core.errors import ValidationError
from swapmoe_edge.artifact.causal_config import CausalConfig
from swapmoe_edge.model.causal import CausalModel, attention_bias, causal_config, position_ids
from swapmoe_edge.model.families.causal import exact_moe_topk
from swapmoe_edge.model.sessions import DenseSessions, open_session, session_options

from . import bounds, ladder, quant
from .causal_checkpoint import CausalReader
from .expert_check import check_experts
from .reference import _quantize_activations_hook, round_activations
from .validate import quantisation_error

FEW = 1 / 8  # at most this share of the real tokens past the bound: flipped routing, not wiring
# The decoder layer's Linear modules an int8/int4 artifact runs as MatMulNBits (router and the
# shared expert's one-column gate stay float).
NBITS_LINEAR = re.compile(r"(self_attn\.[qkvo]_proj|shared_expert\.(gate|up|down)_proj)$")


def nbits_weight(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """A PyTorch-layout weight [out, in] as the MatMulNBits block stored for it computes it (float32)."""
    q, scale = quant.quantize_nbits(np.ascontiguousarray(w.T), bits, block)
    return np.ascontiguousarray(ladder.dequantize(q, scale, bits, w.shape[1]).T)


def rounded_experts(block: int) -> str:
    """An experts implementation registered with transformers' experts interface under the name
    returned: the families' own eager expert loop (experts in index order, a token's outputs added
    with ``index_add_``; the four families run the same one), each product's input rounded to int8
    per ``block`` as MatMulNBits at accuracy level 4 rounds it. A config whose
    ``_experts_implementation`` names it runs int4 experts as an artifact of that level does."""
    import torch  # deferred: validation only
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # deferred: validation only

    name = f"swapmoe_int8_activations_b{block}"
    if name in ALL_EXPERTS_FUNCTIONS:
        return name

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        slots = top_k_index.T  # [k, tokens]: the eager loop's order of (slot, token) pairs
        for e in sorted(set(top_k_index.flatten().tolist())):
            if e >= self.num_experts:  # a masked slot's index
                continue
            pos, tok = torch.where(slots == e)
            gate, up = torch.nn.functional.linear(round_activations(hidden_states[tok], block),
                                                  self.gate_up_proj[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(round_activations(self.act_fn(gate) * up, block), self.down_proj[e])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    ALL_EXPERTS_FUNCTIONS[name] = forward
    return name


def sample_inputs(vocab: int, pad: int, seed: int = 0, batch: int = 2, length: int = 12):
    """Random prompts, the second left-padded to two thirds of the first."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, length), dtype=np.int64)
    mask = np.ones_like(ids)
    if batch > 1:
        mask[1, : length // 3] = 0
        ids[1, : length // 3] = pad
    return ids, mask


@dataclass
class Reference:
    """transformers' side of a check: each layer's input and output [B, S, D], the logits [B, S, V]."""

    block_in: list[np.ndarray]
    block_out: list[np.ndarray]
    logits: np.ndarray


def _layer_state(reader: CausalReader, i: int, dtype: str, expert_dtype: str, nbits: dict | None = None) -> dict:
    """Layer i's tensors under the names transformers' decoder layer holds them (fused experts),
    rounded as the artifact stores them (``nbits``: the manifest's dense_nbits)."""
    import torch  # deferred: validation only

    def dense(name: str, a: np.ndarray):
        if nbits is not None and NBITS_LINEAR.search(name[: -len(".weight")]):
            return torch.from_numpy(nbits_weight(a, nbits["bits"], nbits["block_size"]))
        return torch.from_numpy(np.ascontiguousarray(a.astype(np.float16).astype(np.float32) if dtype == "float16" else a))

    w = reader.attention(i)
    state = {"input_layernorm.weight": w["input_layernorm"], "post_attention_layernorm.weight": w["post_attention_layernorm"],
             "mlp.gate.weight": reader.router(i)}
    for k in "qkvo":
        state[f"self_attn.{k}_proj.weight"] = w[k]
        if w.get(f"{k}_bias") is not None:
            state[f"self_attn.{k}_proj.bias"] = w[f"{k}_bias"]
    if "q_norm" in w:
        state["self_attn.q_norm.weight"], state["self_attn.k_norm.weight"] = w["q_norm"], w["k_norm"]
    shared = reader.shared_expert(i)
    if shared is not None:
        for name in ("gate", "up", "down"):
            state[f"mlp.shared_expert.{name}_proj.weight"] = shared[name]
        state["mlp.shared_expert_gate.weight"] = shared["gate_weight"]
    state = {k: dense(k, v) for k, v in state.items()}
    c = reader.cfg
    gate_up = np.empty((c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size), np.float32)  # filled in place:
    down = np.empty((c.num_experts, c.hidden_size, c.moe_intermediate_size), np.float32)  # one layer's experts, once
    for e in range(c.num_experts):
        wi_t, wo_t = reader.expert(i, e)
        gate_up[e], down[e] = quant.as_stored(wi_t, expert_dtype).T, quant.as_stored(wo_t, expert_dtype).T
    state["mlp.experts.gate_up_proj"], state["mlp.experts.down_proj"] = torch.from_numpy(gate_up), torch.from_numpy(down)
    return state


def streamed_reference(model_dir: Path, cfg: CausalConfig, ids: np.ndarray, mask: np.ndarray, dtype: str,
                       expert_dtype: str, nbits: dict | None = None, expert_nbits: dict | None = None) -> Reference:
    """transformers' own decoder layers run one at a time on weights read from the checkpoint (one
    layer in memory at a time), with the position ids and mask generate gives a left-padded batch.
    ``nbits`` (an int8/int4 artifact's dense_nbits): MatMulNBits weights dequantised, and at
    accuracy level 4 their inputs rounded to int8 per block as the kernel does. ``expert_nbits``
    (int4 experts' entry): at accuracy level 4 the experts' inputs are rounded alike
    (``rounded_experts``)."""
    import torch  # deferred: validation only
    import transformers  # deferred: validation only

    hf_config = transformers.AutoConfig.from_pretrained(str(model_dir))
    hf_config._attn_implementation = "eager"
    hf_config._experts_implementation = "eager"  # the expert loop in index order, as the split model adds them
    if expert_nbits is not None and expert_nbits["accuracy_level"] == 4:
        hf_config._experts_implementation = rounded_experts(expert_nbits["block_size"])
    module = sys.modules[getattr(transformers, cfg.architecture).__module__]
    prefix = cfg.architecture[: -len("ForCausalLM")]
    reader = CausalReader(model_dir, cfg)
    t = ids.shape[1]
    rnd = (lambda a: a.astype(np.float16).astype(np.float32)) if dtype == "float16" else (lambda a: a)
    with torch.no_grad():
        h = torch.from_numpy(np.ascontiguousarray(rnd(reader.embed())[ids]))
        pos = torch.from_numpy(position_ids(mask, t))
        rope = getattr(module, f"{prefix}RotaryEmbedding")(hf_config)(h, pos)
        bias = torch.from_numpy(attention_bias(mask, t, cfg.sliding_window))
        block_in, block_out = [], []
        for i in range(cfg.num_layers):
            with torch.device("meta"):
                layer = getattr(module, f"{prefix}DecoderLayer")(hf_config, i)
            layer.load_state_dict(_layer_state(reader, i, dtype, expert_dtype, nbits), strict=True, assign=True)
            layer.eval()
            if nbits is not None and nbits["accuracy_level"] == 4:
                for name, sub in layer.named_modules():
                    if NBITS_LINEAR.search(name):
                        sub.register_forward_pre_hook(_quantize_activations_hook(nbits["block_size"]))
            block_in.append(h.numpy().copy())
            out = layer(h, position_embeddings=rope, attention_mask=bias, position_ids=pos)
            h = out[0] if isinstance(out, tuple) else out
            block_out.append(h.numpy().copy())
            del layer
        norm = getattr(module, f"{prefix}RMSNorm")(cfg.hidden_size, eps=cfg.rms_norm_eps)
        norm.weight.copy_(torch.from_numpy(rnd(reader.get("model.norm.weight"))))
        head, n = rnd(reader.lm_head()), norm(h)
        if nbits is not None:
            head = nbits_weight(head, nbits["lm_head_bits"], nbits["block_size"])
            if nbits["accuracy_level"] == 4:
                n = torch.from_numpy(quant.quantize_activations(n.numpy(), nbits["block_size"]))
        logits = torch.nn.functional.linear(n, torch.from_numpy(head)).numpy()
    reader.close()
    return Reference(block_in, block_out, logits)


def split_model(artifact: Path) -> CausalModel:
    """The split model, every expert run by its own standalone subgraph (opened per call, not kept)."""
    manifest = load_manifest(artifact)
    cfg = causal_config(manifest)
    opts = session_options()

    def run_expert(key, x):
        return open_session(manifest.path(manifest.experts[key].graph.file), opts).run(None, {"x": x})[0]

    return CausalModel(manifest, DenseSessions(manifest), exact_moe_topk(run_expert, cfg.top_k, cfg.norm_topk_prob))


def block_reductions(c: CausalConfig, length: int) -> int:
    """The sum of reduction lengths along one token's path through one layer (bounds.py's measure):
    the norms, q/k/v, scores, the weighted sum, o, the router, k experts, the shared expert."""
    d, f = c.hidden_size, c.moe_intermediate_size
    return 3 * d + c.head_dim + length + c.num_heads * c.head_dim + d + c.top_k * (d + f) + (d + c.shared_expert_size)


def _real(got: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask.astype(bool)[..., None], got, ref)  # padded positions are not compared


def validate_causal(model_dir: Path, artifact: Path, dtype: str = "float32", expert_dtype: str | None = None, seed: int = 0) -> dict:
    """Compare the artifact with the HF model; raise ValidationError listing every mismatch.

    Block by block: each layer (step graph and experts) on transformers' own input to it, and the
    LM head, every real token within the float32 rounding bound of that block. End to end: the
    split model alone against transformers' logits; a few tokens past the whole stack's bound
    (at most FEW of them) are a routing decision flipped at a near tie and are reported."""
    manifest = load_manifest(artifact)
    c = causal_config(manifest)
    ids, mask = sample_inputs(c.vocab_size, c.pad_token_id, seed)
    t = ids.shape[1]
    nb = manifest.dense_nbits
    ref = streamed_reference(Path(model_dir), c, ids, mask, dtype, expert_dtype or dtype, nb, manifest.expert_nbits)
    model = split_model(artifact)
    pos, bias = position_ids(mask, t), attention_bias(mask, t, c.sliding_window)
    empty = model.empty_state(ids.shape[0])
    checks = []
    for i, layer in enumerate(model.layers):
        got = model.block(i, ref.block_in[i], pos, bias, empty.past_key[i], empty.past_value[i], mask.astype(bool))[0]
        checks.append(bounds.compare(f"{layer.key.name} block output", _real(got, ref.block_out[i], mask), ref.block_out[i],
                                     bounds.rounding_bound(block_reductions(c, t))))
    head = model.sessions.run("lm_head", {"hidden": ref.block_out[-1]})[0]
    checks.append(bounds.compare("logits (LM head on the PyTorch decoder output)", _real(head, ref.logits, mask), ref.logits,
                                 bounds.rounding_bound(2 * c.hidden_size)))
    reader = CausalReader(Path(model_dir), c)
    mismatches, expert_worst = check_experts(manifest, lambda k: reader.expert(k.layer, k.expert), "swiglu", seed)
    reader.close()
    mismatches += [ch if isinstance(ch, str) else ch.describe() for ch in checks if isinstance(ch, str) or not ch.passed]
    got = _real(model.forward(ids, mask), ref.logits, mask)
    e2e = bounds.compare("logits (split model end to end, real tokens)", got, ref.logits,
                         bounds.rounding_bound(c.num_layers * block_reductions(c, t) + 2 * c.hidden_size))
    if isinstance(e2e, str):
        mismatches.append(e2e)
    elif int(e2e.bad.sum()) > max(1, FEW * int(mask.sum())):
        mismatches.append(e2e.describe())
    if mismatches:
        raise ValidationError(mismatches)
    loss = None
    if nb is not None:  # the quantisation's own cost: the artifact against the float32 model
        loss = quantisation_error(got, streamed_reference(Path(model_dir), c, ids, mask, "float32", "float32").logits)
    blocks = [ch for ch in checks if not isinstance(ch, str)]
    return {
        "passed": True,
        "max_abs_diff": float(np.max(np.abs(got - ref.logits))),
        "blocks_compared": len(blocks),
        "experts_compared": len(manifest.experts),
        "expert_worst_share_of_bound": expert_worst,
        "block_worst_share_of_bound": max(ch.worst / ch.bound for ch in blocks),
        "inputs": {"batch": int(ids.shape[0]), "length": int(t), "left_padded_rows": 1, "seed": seed},
        "end_to_end_worst_token_error": e2e.worst,
        "end_to_end_outliers": e2e.outliers(),
        # int8/int4 dense: the checks above are against PyTorch on the same quantised weights; this
        # is how far the artifact is from the float32 checkpoint (lossy, measured).
        **({"quantisation_vs_float": loss} if loss is not None else {}),
    }
