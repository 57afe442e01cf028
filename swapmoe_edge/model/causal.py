"""The split decoder-only top-k MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): embed, one
step graph per layer with its KV cache, the routed experts, the LM head.

Each layer's step graph runs everything up to the routed experts (export/causal_graphs.py);
the ``moe`` callback adds their gated sum, so the budget policies stay out of the compute
path, as in split.py. Batches are padded on the left, as Hugging Face pads a decoder-only
model's prompts: position ids count only real tokens (``cumsum(mask) - 1``), and the mask
hides padded keys from every query.
Shapes: B batch, S prompt tokens, T new tokens, P cached tokens, L = P + T, D hidden,
Hk key/value heads, Dh head dim, E experts, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from swapmoe_edge.artifact.causal_config import CausalConfig
from swapmoe_edge.artifact.manifest import LayerEntry, Manifest
from swapmoe_edge.core.errors import ArtifactError, InputError
from swapmoe_edge.model.sessions import DenseSessions
from swapmoe_edge.model.split import NEG, Capture, MoEFn, MoEHook, _around


def causal_config(manifest: Manifest) -> CausalConfig:
    """The decoder config the manifest records; ArtifactError when it holds none or a broken one."""
    raw = manifest.extra.get("causal_config")
    try:
        return CausalConfig.from_dict(raw)
    except (TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{manifest.root / 'manifest.json'}: extra.causal_config is missing or malformed ({e}). "
                            "Export the model again.") from e


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id rows -> ids and attention mask [B, S], padded on the left."""
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("every prompt needs at least one token (an empty prompt has no position to continue from)")
    b, s = len(rows), max(len(r) for r in rows)
    ids = np.full((b, s), pad_id, dtype=np.int64)
    mask = np.zeros((b, s), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, s - len(row):] = row
        mask[i, s - len(row):] = 1
    return ids, mask


def position_ids(mask: np.ndarray, t: int) -> np.ndarray:
    """HF's positions of the last ``t`` columns of ``mask`` [B, L]: cumsum(mask) - 1, and 1 where padded."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos)[:, -t:].astype(np.int64)


def attention_bias(mask: np.ndarray, t: int, window: int | None = None) -> np.ndarray:
    """[B, 1, T, L]: 0 where query t (the last T of L columns) may see key l, HF's float32 min elsewhere:
    causal, padded keys hidden, and keys ``window`` or more columns back with a sliding window."""
    b, total = mask.shape
    q = np.arange(total - t, total)[:, None]  # [T, 1] each query's column
    k = np.arange(total)[None, :]  # [1, L]
    ok = (k <= q)[None] & (mask[:, None, :] != 0)  # [B, T, L]
    if window is not None:
        ok &= (q - k < window)[None]
    return np.where(ok, np.float32(0), NEG).astype(np.float32)[:, None]


@dataclass
class CausalState:
    """A request's cache: per layer key/value [B, Hk, P, Dh], the mask of its P columns [B, P],
    and the prompt and its mask [B, S] that the first step runs (None once it has). ``rows``: the
    rows of the prompt that the first step's outputs stand for, where a search picked rows before
    the prompt ran (beam search's K copies of each): the prompt runs once a row, not K times."""

    past_key: list[np.ndarray]
    past_value: list[np.ndarray]
    mask: np.ndarray
    prompt: np.ndarray | None = None
    prompt_mask: np.ndarray | None = None
    rows: np.ndarray | None = None

    @property
    def past_len(self) -> int:
        return self.mask.shape[1]

    def reorder(self, index: np.ndarray) -> "CausalState":
        """Select rows (beam search keeps the cache of the surviving beams)."""
        if self.prompt is not None:  # not run yet: remember the rows, run each prompt row once
            return replace(self, rows=index if self.rows is None else self.rows[index])
        return CausalState([k[index] for k in self.past_key], [v[index] for v in self.past_value], self.mask[index])


class CausalModel:
    """``moe`` runs every sparse layer's routed experts; ``hook`` (optional) runs around it on every
    call, and a call's own ``hook`` around both (split.MoEHook)."""

    def __init__(self, manifest: Manifest, sessions: DenseSessions, moe: MoEFn, hook: MoEHook | None = None):
        self.m = manifest
        self.cfg = causal_config(manifest)
        self.sessions = sessions
        self.moe = moe if hook is None else _around(hook, moe)
        self.layers = manifest.stack_layers("decoder")

    def _moe(self, layer: LayerEntry, normed, logits, token_mask, hook: MoEHook | None) -> np.ndarray:
        if hook is None:
            return self.moe(layer, normed, logits, token_mask)
        return hook(layer, normed, logits, token_mask, self.moe)

    def empty_state(self, batch: int) -> CausalState:
        c = self.cfg
        empty = np.zeros((batch, c.num_kv_heads, 0, c.head_dim), dtype=np.float32)
        return CausalState([empty] * len(self.layers), [empty] * len(self.layers), np.zeros((batch, 0), dtype=np.int64))

    def run(self, ids: np.ndarray, mask: np.ndarray, state: CausalState, capture: Capture | None = None,
            hook: MoEHook | None = None, last_only: bool = False) -> tuple[np.ndarray, CausalState]:
        """ids, mask [B, T] (T new tokens after the state's P) -> logits [B, T, V] (``last_only``: of the
        last position, [B, 1, V]) and the grown cache."""
        t = ids.shape[1]
        full = np.concatenate([state.mask, mask.astype(np.int64)], axis=1)  # [B, L]
        pos = position_ids(full, t)  # [B, T]
        bias = attention_bias(full, t, self.cfg.sliding_window)  # [B, 1, T, L]
        token_mask = mask.astype(bool)
        h = self.sessions.run("embed", {"input_ids": ids.astype(np.int64)})[0]  # [B, T, D]
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            h, key, value = self.block(i, h, pos, bias, state.past_key[i], state.past_value[i], token_mask, hook)
            keys.append(key)
            values.append(value)
            if capture:
                capture(layer.key, h)
        # A prompt's step needs the last position only: the head on all T positions held B x T x V
        # floats (9 MB for a 70-token prompt's four beams at a vocabulary of 8192) for one row of them.
        logits = self.sessions.run("lm_head", {"hidden": h[:, -1:] if last_only else h})[0]  # [B, T or 1, V]
        return logits, CausalState(keys, values, full)

    def block(self, i: int, h: np.ndarray, pos: np.ndarray, bias: np.ndarray, past_key: np.ndarray, past_value: np.ndarray,
              token_mask: np.ndarray | None, hook: MoEHook | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Layer i on h [B, T, D]: its step graph, then the routed experts -> (h, present key, present value)."""
        layer = self.layers[i]
        out = self.sessions.run(layer.parts["step"], {"hidden": h, "position_ids": pos, "attn_bias": bias,
                                                      "past_key": past_key, "past_value": past_value})
        # hidden_out, present_key, present_value, normed [B, T, D], router_logits [B, T, E]
        return out[0] + self._moe(layer, out[3], out[4], token_mask, hook), out[1], out[2]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, capture: Capture | None = None,
                hook: MoEHook | None = None) -> np.ndarray:
        """Logits [B, S, V] of a (left-padded) batch, as HF's model(input_ids, attention_mask, position_ids)
        with the position ids generate would give it."""
        mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.run(input_ids, mask, self.empty_state(input_ids.shape[0]), capture, hook)[0]

    def start(self, ids: np.ndarray, mask: np.ndarray) -> CausalState:
        """A request's state before its first step: the prompt [B, S] still to run."""
        state = self.empty_state(ids.shape[0])
        state.prompt, state.prompt_mask = ids.astype(np.int64), mask.astype(np.int64)
        return state

    def step(self, state: CausalState, next_ids: np.ndarray, hook: MoEHook | None = None) -> tuple[np.ndarray, CausalState]:
        """The next-token logits [B, V]: of the prompt's last position on the first step (``next_ids``
        unused), else of ``next_ids`` [B] after the cache."""
        if state.prompt is not None:
            rows = state.rows
            logits, state = self.run(state.prompt, state.prompt_mask, self.empty_state(state.prompt.shape[0]), hook=hook,
                                     last_only=True)
            if rows is not None:
                logits, state = logits[rows], state.reorder(rows)
        else:
            ids = next_ids.reshape(-1, 1).astype(np.int64)
            logits, state = self.run(ids, np.ones_like(ids), state, hook=hook)
        return logits[:, -1, :], state
