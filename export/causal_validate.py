"""Check an exported decoder-only MoE artifact against the PyTorch model.

Two checks, every mismatch reported together (ValidationError):
- every expert's standalone subgraph against SwiGLU in numpy on the weights it stores, within
  the float32 rounding bound of its two matmuls (bounds.py);
- the split model end to end (every expert run by its own subgraph) against transformers'
  logits on a left-padded batch, with the weights rounded as the artifact stores them, each
  real token within the rounding bound of the whole stack. A few tokens past it while the rest
  are within it are a routing decision flipped at a near tie (reported, not failed).

The PyTorch model is loaded whole (transformers' from_pretrained), so validating needs the
memory of the float32 model; export --no-validate for models bigger than RAM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.core.errors import ValidationError
from swapmoe_edge.model.causal import CausalModel, causal_config, position_ids
from swapmoe_edge.model.families.causal import exact_moe_topk
from swapmoe_edge.model.sessions import DenseSessions, open_session, session_options

from . import bounds, quant

FEW = 1 / 8  # at most this share of the real tokens past the bound: flipped routing, not wiring


def sample_inputs(vocab: int, pad: int, seed: int = 0, batch: int = 2, length: int = 12):
    """Random prompts, the second left-padded to two thirds of the first."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, length), dtype=np.int64)
    mask = np.ones_like(ids)
    if batch > 1:
        mask[1, : length // 3] = 0
        ids[1, : length // 3] = pad
    return ids, mask


def hf_logits(model_dir: Path, arch: str, ids: np.ndarray, mask: np.ndarray, dtype: str, expert_dtype: str) -> np.ndarray:
    """transformers' logits [B, S, V], the weights rounded as the artifact stores them."""
    import torch  # deferred: validation only
    import transformers  # deferred: validation only

    model = getattr(transformers, arch).from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name or name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj"):
                continue
            if dtype == "float16":
                p.copy_(p.half().float())
        for layer in model.model.layers:
            experts = layer.mlp.experts
            for e in range(experts.gate_up_proj.shape[0]):
                wi_t = experts.gate_up_proj[e].T.numpy()  # [D, 2F]
                wo_t = experts.down_proj[e].T.numpy()  # [F, D]
                experts.gate_up_proj[e] = torch.from_numpy(np.ascontiguousarray(quant.as_stored(wi_t, expert_dtype).T))
                experts.down_proj[e] = torch.from_numpy(np.ascontiguousarray(quant.as_stored(wo_t, expert_dtype).T))
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(position_ids(mask, ids.shape[1])))
    return out.logits.float().numpy()


def check_experts(manifest, seed: int = 0, tokens: int = 4) -> tuple[list[str], float]:
    """Every expert's standalone subgraph against numpy SwiGLU on its stored weights: (mismatches, worst share of the bound)."""
    rng = np.random.default_rng(seed)
    opts = session_options(1)
    d, f = manifest.config.d_model, manifest.config.d_ff
    bound = bounds.rounding_bound(d + 2 * f)
    bad, worst = [], 0.0
    for key, entry in manifest.experts.items():
        weights = _stored_weights(manifest, entry)
        x = rng.standard_normal((tokens, d)).astype(np.float32)
        got = open_session(manifest.path(entry.graph.file), opts).run(None, {"x": x})[0]
        h = x.astype(np.float64) @ weights[0]
        gate, up = h[:, :f], h[:, f:]
        ref = (gate / (1 + np.exp(-gate)) * up) @ weights[1]
        cmp = bounds.compare(f"expert {key.name}", got[None], ref[None].astype(np.float32), bound)
        if isinstance(cmp, str):
            bad.append(cmp)
            continue
        worst = max(worst, cmp.worst / bound)
        if not cmp.passed:
            bad.append(cmp.describe())
    return bad, worst


def _stored_weights(manifest, entry) -> tuple[np.ndarray, np.ndarray]:
    """An expert's float64 wi [D, 2F] and wo [F, D] as its weight block stores them."""
    raw = manifest.path(entry.weights_file).read_bytes()
    arrays = {}
    for t in entry.tensors:
        dt = np.dtype(t.dtype)
        n = int(np.prod(t.shape))
        arrays[t.role] = np.frombuffer(raw, dtype=dt, count=n, offset=t.offset).reshape(t.shape)
    if manifest.expert_dtype == "int8":
        return tuple(quant.dequantize_int8(arrays[r], arrays[f"{r}_scale"]).astype(np.float64) for r in ("wi", "wo"))
    if manifest.expert_dtype == "int4":
        return tuple(quant.dequantize_int4(arrays[r], arrays[f"{r}_scale"]).astype(np.float64) for r in ("wi", "wo"))
    return arrays["wi"].astype(np.float64), arrays["wo"].astype(np.float64)


def artifact_logits(artifact: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The split model's logits, every expert run by its own standalone subgraph."""
    manifest = load_manifest(artifact)
    cfg = causal_config(manifest)
    opts = session_options()

    def run_expert(key, x):
        return open_session(manifest.path(manifest.experts[key].graph.file), opts).run(None, {"x": x})[0]

    model = CausalModel(manifest, DenseSessions(manifest), exact_moe_topk(run_expert, cfg.top_k, cfg.norm_topk_prob))
    return model.forward(ids, mask)


def stack_reductions(manifest) -> int:
    """The sum of reduction lengths along one token's path through the model (bounds.py's measure)."""
    c = causal_config(manifest)
    d, f = c.hidden_size, c.moe_intermediate_size
    per_layer = 4 * d + 2 * c.head_dim + c.num_heads * c.head_dim + c.top_k * (d + f) + 3 * c.shared_expert_size
    return c.num_layers * per_layer + 2 * d


def validate_causal(model_dir: Path, artifact: Path, dtype: str = "float32", expert_dtype: str | None = None, seed: int = 0) -> dict:
    """Compare the artifact with the HF model; raise ValidationError listing every mismatch."""
    manifest = load_manifest(artifact)
    c = causal_config(manifest)
    ids, mask = sample_inputs(c.vocab_size, c.pad_token_id, seed)
    ref = hf_logits(Path(model_dir), c.architecture, ids, mask, dtype, expert_dtype or dtype)
    got = artifact_logits(artifact, ids, mask)
    real = mask.astype(bool)
    got_real = np.where(real[..., None], got, ref)  # padded positions are not compared
    mismatches, expert_worst = check_experts(manifest, seed)
    bound = bounds.rounding_bound(stack_reductions(manifest))
    e2e = bounds.compare("logits (split model end to end, real tokens)", got_real, ref, bound)
    if isinstance(e2e, str):
        mismatches.append(e2e)
    elif int(e2e.bad.sum()) > max(1, FEW * int(real.sum())):
        mismatches.append(e2e.describe())
    if mismatches:
        raise ValidationError(mismatches)
    return {
        "passed": True,
        "max_abs_diff": float(np.max(np.abs(got_real - ref))),
        "experts_compared": len(manifest.experts),
        "expert_worst_share_of_bound": expert_worst,
        "inputs": {"batch": int(ids.shape[0]), "length": int(ids.shape[1]), "left_padded_rows": 1, "seed": seed},
        "token_bound": bound,
        "end_to_end_worst_token_error": e2e.worst,
        "end_to_end_outliers": e2e.outliers(),
    }
