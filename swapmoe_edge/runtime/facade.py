"""The budgeted runtime: load an artifact, fit a memory budget, generate, report stats.

    rt = Runtime("artifact/", RuntimeConfig(policy="swapmoe", budget="33%"))
    results = rt.summarize(["long text ..."], max_new_tokens=32)
    rt.close()

A facade over the parts that ``load`` returns (load.py): it checks a request, runs it in
chunks through the family's generation loop, and measures each one as its steps come out.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from swapmoe_edge.model.generate import Decoding
from swapmoe_edge.model.moe import softmax
from swapmoe_edge.model.split import MoEHook, observe
from swapmoe_edge.residency.importance import ImportanceTracker, Profile
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.runtime.load import Parts, load
from swapmoe_edge.runtime.requests import Once, background_io_closed, check_request, chunks, encode_texts
from swapmoe_edge.runtime.stats import Meter, Result, request_stats, residents_by_rung
from swapmoe_edge.system import pagecache


class Runtime:
    """``artifact``: an artifact folder (loaded here, with ``load``'s keyword arguments), or the
    ``Parts`` that ``load`` returned."""

    def __init__(self, artifact: str | Path | Parts, config: RuntimeConfig = RuntimeConfig(), **load_kw):
        self.parts = artifact if isinstance(artifact, Parts) else load(artifact, config, **load_kw)
        self._requests = itertools.count()  # one number per chunk that ran
        self._counted = None  # deterministic: the counters at the last request's end (the boundary's round counts next)
        # After the first token ORT has mapped or copied every dense page it needs; the rest
        # of the dense files' cached pages would only count against a device's memory limit.
        # (Dropped earlier, pages ORT maps lazily had to come off flash again in the first request.)
        files = [self.parts.manifest.path(rel) for rel in self.parts.dense_files]
        self._after_first_token = Once(lambda: pagecache.drop(files))

    # -- the parts, by the names callers know ------------------------------------------------
    manifest = property(lambda self: self.parts.manifest)
    config = property(lambda self: self.parts.config)
    family = property(lambda self: self.parts.family)
    model = property(lambda self: self.parts.model)
    sessions = property(lambda self: self.parts.sessions)
    tokenizer = property(lambda self: self.parts.tokenizer)
    sparse = property(lambda self: self.parts.sparse)
    norms = property(lambda self: self.parts.norms)
    profile = property(lambda self: self.parts.profile)
    residents = property(lambda self: self.parts.residents)
    policy = property(lambda self: self.parts.policy)
    startup = property(lambda self: self.parts.startup)
    no_repeat_ngram_size = property(lambda self: self.parts.no_repeat_ngram_size)
    store = property(lambda self: self.parts.experts.store)
    expert_cost = property(lambda self: self.parts.experts.cost)
    placement = property(lambda self: self.parts.experts.placement)
    prepacked = property(lambda self: self.parts.experts.prepacked)
    runners = property(lambda self: self.parts.experts.runners)
    rungs = property(lambda self: self.parts.experts.rungs)
    device = property(lambda self: self.parts.device.profile)
    providers = property(lambda self: self.parts.device.providers)
    provider_options = property(lambda self: self.parts.device.provider_options)
    device_messages = property(lambda self: self.parts.device.messages)
    threads = property(lambda self: self.parts.device.threads)
    baseline = property(lambda self: self.parts.fit.baseline)
    monitor = property(lambda self: self.parts.fit.monitor)
    budget_bytes = property(lambda self: self.parts.fit.budget_bytes)
    budget_source = property(lambda self: self.parts.fit.budget_source)

    # -- requests -----------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each text, cut to max_source_tokens (with a warning), and which were cut."""
        return encode_texts(self.tokenizer, texts, self.config.max_source_tokens, self.manifest.root)

    def generate(self, input_ids: Sequence[Sequence[int]], max_new_tokens: int = 32, num_beams: int = 1,
                 forced_ids: Sequence[Sequence[int]] | None = None, *, hook: MoEHook | None = None) -> list[Result]:
        """Generate for a batch of token-id rows (padded by the family's loop); one Result per row.

        Rows run together in chunks of at most ``max_source_tokens`` rows x beams x tokens
        (the envelope the baseline measured); each chunk is one request, and each Result's
        stats are its chunk's. ``forced_ids`` (greedy only, one row per input): decoder tokens
        fed instead of the model's choices, for benchmarks on random weights
        (generate.greedy_steps). ``hook``: around every sparse layer's MoE (split.MoEHook).
        """
        limit = self.config.max_source_tokens
        check_request(input_ids, max_new_tokens, num_beams, forced_ids, limit)
        results: list[Result] = []
        for chunk in chunks(input_ids, limit // num_beams):
            forced = None
            if forced_ids is not None:
                start = len(results)
                forced = np.array([list(r[:max_new_tokens]) for r in forced_ids[start: start + len(chunk)]], dtype=np.int64)
            decoding = Decoding(max_new_tokens, num_beams, self.no_repeat_ngram_size, forced)
            results += self._request(chunk, decoding, hook)
        return results

    def _request(self, rows: Sequence[Sequence[int]], decoding: Decoding, hook: MoEHook | None) -> list[Result]:
        """One chunk through the family's generation loop: stamp each token, open background
        I/O at the first, then count what the request did."""
        p = self.parts
        # Deterministic, the swaps of the boundary before this request count in it: it waited for them.
        meter = Meter(p.policy, p.experts.store, self._counted if p.policy.deterministic else None)
        meter.started(p.policy.begin_request())
        with background_io_closed(p.policy.background_io) as open_background_io:
            for step in p.family.generate(p.model, rows, decoding, hook):
                meter.token()
                if step.index == 0:
                    open_background_io()
                    self._after_first_token()
        stats = request_stats(p, meter, next(self._requests))  # before the boundary's round moves residents
        self._counted = meter.after
        p.policy.end_request()
        return [Result(None, list(map(int, row)), stats["exact"], dict(stats)) for row in step.sequences]

    def summarize(self, texts: Sequence[str], max_new_tokens: int = 32, num_beams: int = 1, *,
                  hook: MoEHook | None = None) -> list[Result]:
        ids, truncated = self.encode_texts(texts)
        results = self.generate(ids, max_new_tokens=max_new_tokens, num_beams=num_beams, hook=hook)
        for r, cut in zip(results, truncated):
            r.summary = self.tokenizer.decode(r.token_ids, skip_special_tokens=True).strip()
            r.stats["truncated_input"] = cut
        return results

    def residents_by_rung(self) -> dict[str, int]:
        return residents_by_rung(self.residents, self.sparse, self.manifest.expert_dtype)

    def profile_texts(self, texts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8) -> Profile:
        """Eq. 1 importance over calibration texts (generation included), observed on every layer."""
        tracker = ImportanceTracker(self.norms, self.family.top_k)  # Eq. 1 over each token's k choices
        hook = observe(lambda layer, normed, logits, mask: tracker.observe(
            layer.key, np.linalg.norm(normed, axis=-1), softmax(logits), mask))
        for i in range(0, len(texts), batch_size):
            ids, _ = self.encode_texts(texts[i: i + batch_size])
            self.generate(ids, max_new_tokens=max_new_tokens, hook=hook)
        return replace(Profile.from_tracker(tracker, {"texts": len(texts), "max_new_tokens": max_new_tokens}), source="profile")

    # -- lifecycle ------------------------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a background cold start has filled the start set (True) or ``timeout`` passed."""
        return self.policy.wait_filled(timeout)

    def close(self) -> None:
        self.parts.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
