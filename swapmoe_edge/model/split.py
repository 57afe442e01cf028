"""The split Switch Transformer: encoder, decoder step with KV cache, LM head.

It runs the artifact's dense subgraphs in order and hands each sparse layer to a
``moe`` callback, so that the budget policies stay out of the compute path. A ``hook``
(given at construction, or to one call) runs around that callback: it may observe the
router (profiles, traces), time it, or replace it (substitution), without assigning to
the model.
Shapes: B batch, S source tokens, T new decoder tokens, P past tokens, L = P + T,
D d_model, H heads, K d_kv, E experts, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from swapmoe_edge.artifact.manifest import LayerEntry, Manifest
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.model.moe import dispatch, route
from swapmoe_edge.model.sessions import DenseSessions

NEG = np.float32(np.finfo(np.float32).min)  # what HF adds for a masked position

# moe(layer, normed[B,T,D], router_logits[B,T,E], token_mask[B,T] or None) -> ffn_out[B,T,D]
MoEFn = Callable[[LayerEntry, np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]
# hook(layer, normed, router_logits, token_mask, moe) -> ffn_out: runs in place of ``moe`` and
# is handed it, to call (observe, time) or not (replace).
MoEHook = Callable[[LayerEntry, np.ndarray, np.ndarray, "np.ndarray | None", MoEFn], np.ndarray]
Observer = Callable[[LayerEntry, np.ndarray, np.ndarray, "np.ndarray | None"], None]
Capture = Callable[[LayerKey, np.ndarray], None]


def observe(fn: Observer) -> MoEHook:
    """A hook that shows each sparse layer's input to ``fn(layer, normed, logits, token_mask)``, then runs the MoE."""

    def hook(layer, normed, logits, token_mask, moe):
        fn(layer, normed, logits, token_mask)
        return moe(layer, normed, logits, token_mask)

    return hook


def _around(hook: MoEHook, moe: MoEFn) -> MoEFn:
    return lambda layer, normed, logits, token_mask: hook(layer, normed, logits, token_mask, moe)


@dataclass
class DecoderState:
    """Per-request decoder cache: self-attention K/V grow; cross-attention K/V are fixed."""

    past_key: list[np.ndarray]  # per decoder layer [B, H, P, K]
    past_value: list[np.ndarray]
    cross_key: list[np.ndarray]  # per decoder layer [B, H, S, K]
    cross_value: list[np.ndarray]
    cross_bias: np.ndarray  # [B, 1, 1, S]

    @property
    def past_len(self) -> int:
        return self.past_key[0].shape[2] if self.past_key else 0

    def reorder(self, index: np.ndarray) -> "DecoderState":
        """Select batch rows (beam search keeps the cache of the surviving beams)."""
        return DecoderState(
            [k[index] for k in self.past_key],
            [v[index] for v in self.past_value],
            [k[index] for k in self.cross_key],
            [v[index] for v in self.cross_value],
            self.cross_bias[index],
        )


class SplitModel:
    """``moe`` runs every sparse layer's experts; ``hook`` (optional) runs around it on every call,
    and a call's own ``hook`` around both."""

    def __init__(self, manifest: Manifest, sessions: DenseSessions, moe: MoEFn, hook: MoEHook | None = None):
        self.m = manifest
        self.cfg = manifest.config
        self.sessions = sessions
        self.moe = moe if hook is None else _around(hook, moe)
        self.enc_layers = manifest.stack_layers("encoder")
        self.dec_layers = manifest.stack_layers("decoder")
        self._step_bias_table: np.ndarray | None = None  # [1, H, 1, M]: relative positions -(M-1)..0

    # -- pieces ------------------------------------------------------------------------
    def _run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        return self.sessions.run(name, feeds)

    def _moe(self, layer: LayerEntry, normed, logits, token_mask, hook: MoEHook | None) -> np.ndarray:
        if hook is None:
            return self.moe(layer, normed, logits, token_mask)
        return hook(layer, normed, logits, token_mask, self.moe)

    def _ffn(self, layer: LayerEntry, h: np.ndarray, token_mask: np.ndarray | None, hook: MoEHook | None) -> np.ndarray:
        if not layer.sparse:
            return self._run(layer.parts["ffn"], hidden=h)[0]
        normed, logits = self._run(layer.parts["router"], hidden=h)
        return h + self._moe(layer, normed, logits, token_mask, hook)

    def _experts(self, layer: LayerEntry, out: list[np.ndarray], token_mask: np.ndarray | None,
                 hook: MoEHook | None) -> np.ndarray:
        """A fused layer's outputs (hidden_out[, normed, router_logits]) -> the block output."""
        if not layer.sparse:
            return out[0]
        return out[0] + self._moe(layer, out[-2], out[-1], token_mask, hook)

    def _position_bias(self, stack: str, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        rel = (k_pos[None, :] - q_pos[:, None]).astype(np.int64)  # [Q, K]
        return self._run(f"{stack[:3]}.position_bias", rel_pos=rel)[0]  # [1, H, Q, K]

    # -- encoder -----------------------------------------------------------------------
    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, capture: Capture | None = None,
               hook: MoEHook | None = None) -> np.ndarray:
        """input_ids, attention_mask [B, S] -> encoder output [B, S, D] (final norm applied)."""
        h = self._run("enc.embed", input_ids=input_ids.astype(np.int64))[0]  # [B, S, D]
        bias = self.encoder_bias(attention_mask)  # [B, H, S, S]
        mask = attention_mask.astype(bool)
        for layer in self.enc_layers:
            h = self.encoder_block(layer, h, bias, mask, hook)
            if capture:
                capture(layer.key, h)
        return self._run("enc.final_norm", hidden=h)[0]

    def encoder_bias(self, attention_mask: np.ndarray) -> np.ndarray:
        """Relative position bias plus padding mask, shared by every encoder block: [B, H, S, S]."""
        pos = np.arange(attention_mask.shape[1])
        pad = (1.0 - attention_mask.astype(np.float32))[:, None, None, :] * NEG  # [B, 1, 1, S]
        return (self._position_bias("encoder", pos, pos) + pad).astype(np.float32)

    def encoder_block(self, layer: LayerEntry, h: np.ndarray, bias: np.ndarray, mask: np.ndarray,
                      hook: MoEHook | None = None) -> np.ndarray:
        if "block" in layer.parts:  # schema 2: attention and FFN/router in one graph
            return self._experts(layer, self._run(layer.parts["block"], hidden=h, attn_bias=bias), mask, hook)
        h = self._run(layer.parts["attn"], hidden=h, attn_bias=bias)[0]
        return self._ffn(layer, h, mask, hook)

    # -- decoder -----------------------------------------------------------------------
    def start_decoder(self, encoder_out: np.ndarray, attention_mask: np.ndarray) -> DecoderState:
        b = encoder_out.shape[0]
        h, k = self.cfg.num_heads, self.cfg.d_kv
        keys, values = [], []
        for layer in self.dec_layers:
            ck, cv = self._run(layer.parts["cross_kv"], encoder_hidden=encoder_out)
            keys.append(ck)
            values.append(cv)
        empty = np.zeros((b, h, 0, k), dtype=np.float32)
        cross_bias = ((1.0 - attention_mask.astype(np.float32))[:, None, None, :] * NEG).astype(np.float32)
        return DecoderState([empty] * len(self.dec_layers), [empty] * len(self.dec_layers), keys, values, cross_bias)

    def decode(self, ids: np.ndarray, state: DecoderState, capture: Capture | None = None,
               hook: MoEHook | None = None) -> tuple[np.ndarray, DecoderState]:
        """ids [B, T] (T new tokens after P cached ones) -> logits [B, T, V] and the grown cache."""
        h = self._run("dec.embed", input_ids=ids.astype(np.int64))[0]  # [B, T, D]
        bias = self.decoder_bias(ids.shape[1], state.past_len)  # [1, H, T, L]
        new_k, new_v = [], []
        for i, layer in enumerate(self.dec_layers):
            h, pk, pv = self.decoder_block(i, layer, h, bias, state, hook)
            new_k.append(pk)
            new_v.append(pv)
            if capture:
                capture(layer.key, h)
        logits = self._run("lm_head", hidden=h)[0]
        return logits, DecoderState(new_k, new_v, state.cross_key, state.cross_value, state.cross_bias)

    def decoder_bias(self, t: int, p: int) -> np.ndarray:
        """Relative position bias plus the causal mask for T new tokens after P cached: [1, H, T, L]."""
        if t == 1:
            return self._step_bias(p)
        q_pos, k_pos = np.arange(p, p + t), np.arange(p + t)
        causal = np.where(k_pos[None, :] <= q_pos[:, None], np.float32(0), NEG)  # [T, L]
        return (self._position_bias("decoder", q_pos, k_pos) + causal).astype(np.float32)

    def _step_bias(self, p: int) -> np.ndarray:
        """decoder_bias(1, p) from a table made once: one new token sees keys at relative
        positions -p..0, and no key lies in its future, so its causal mask is all zeros."""
        table = self._step_bias_table
        if table is None or table.shape[-1] < p + 1:
            m = max(64, 2 * (p + 1))
            table = self._run("dec.position_bias", rel_pos=np.arange(1 - m, 1, dtype=np.int64)[None, :])[0]
            self._step_bias_table = table  # [1, H, 1, m]
        m = table.shape[-1]
        return np.ascontiguousarray(table[..., m - 1 - p:])  # [1, H, 1, p + 1]

    def decoder_block(self, i: int, layer: LayerEntry, h: np.ndarray, bias: np.ndarray, state: DecoderState,
                      hook: MoEHook | None = None):
        """Decoder block i: self-attention over cache + new tokens, cross-attention, FFN/MoE."""
        if "step" in layer.parts:  # schema 2: the whole layer up to the experts in one graph
            out = self._run(
                layer.parts["step"], hidden=h, attn_bias=bias, past_key=state.past_key[i],
                past_value=state.past_value[i], cross_bias=state.cross_bias,
                cross_key=state.cross_key[i], cross_value=state.cross_value[i],
            )  # hidden_out, present_key, present_value[, normed, router_logits]
            return self._experts(layer, [out[0]] + out[3:], None, hook), out[1], out[2]
        h, pk, pv = self._run(
            layer.parts["self_attn"], hidden=h, attn_bias=bias,
            past_key=state.past_key[i], past_value=state.past_value[i],
        )
        h = self._run(
            layer.parts["cross_attn"], hidden=h, cross_bias=state.cross_bias,
            cross_key=state.cross_key[i], cross_value=state.cross_value[i],
        )[0]
        return self._ffn(layer, h, None, hook), pk, pv

    def forward(self, input_ids, attention_mask, decoder_input_ids, capture: Capture | None = None,
                hook: MoEHook | None = None) -> np.ndarray:
        """Teacher-forced logits [B, T, V], as HF's model(input_ids, attention_mask, decoder_input_ids)."""
        enc = self.encode(input_ids, attention_mask, capture, hook)
        logits, _ = self.decode(decoder_input_ids, self.start_decoder(enc, attention_mask), capture, hook)
        return logits


def full_moe(run_expert: Callable, capacity: int, route: Callable = route) -> MoEFn:
    """The exact MoE step with every expert available: ``run_expert(ExpertKey, x) -> y``;
    ``route``: the family's router (Switch's top-1 by default; a top-k one's routing has a k axis)."""

    def moe(layer: LayerEntry, normed, logits, token_mask):
        r = route(logits, capacity)
        return dispatch(r, normed, lambda e, x: run_expert(layer.experts[e], x))

    return moe
