"""The budgeted runtime: load an artifact, fit a memory budget, generate, report stats.

    rt = Runtime("artifact/", RuntimeConfig(policy="swapmoe", budget="33%"))
    results = rt.summarize(["long text ..."], max_new_tokens=32)
    results = rt.generate_texts(["a prompt"], max_new_tokens=32)
    rt.close()

``summarize`` takes documents: an encoder-decoder model reads each as its input, a
decoder-only model through the prompt template its manifest records. ``generate_texts``
takes prompts as they are (an encoder-decoder model reads a prompt as its encoder input).

A facade over the parts that ``load`` returns (load.py): it checks a request, runs it in
chunks through the family's generation loop, and measures each one as its steps come out.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from swapmoe_edge.core.errors import InputError
from swapmoe_edge.model.generate import Decoding, Step
from swapmoe_edge.model.moe import softmax
from swapmoe_edge.model.split import MoEHook, observe
from swapmoe_edge.residency.importance import ImportanceTracker, Profile
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.runtime.load import Parts, load
from swapmoe_edge.runtime.requests import (Once, background_io_closed, check_request, chunks, encode_prompts,
                                           encode_texts, generation_beams)
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
    # a request's beam width when it names none: the checkpoint's generation config's
    default_num_beams = property(lambda self: generation_beams(self.parts.manifest.generation))
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
    @property
    def decoder_only(self) -> bool:
        return self.family.kind == "decoder-only"

    @property
    def prompt_template(self) -> str | None:
        """A decoder-only model's summarisation prompt ("...{document}..."), as its manifest records it."""
        return self.manifest.extra.get("prompt_template")

    def encode_texts(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each text as it is, cut to max_source_tokens (with a warning), and which were cut."""
        return encode_texts(self.tokenizer, texts, self.config.max_source_tokens, self.manifest.root,
                            keep_end=self.decoder_only)

    def encode_documents(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of the documents to summarise, and which were cut: a decoder-only model's
        through its prompt template (InputError when its manifest has none)."""
        if not self.decoder_only:
            return self.encode_texts(texts)
        if not self.prompt_template:
            raise InputError(f"artifact {self.manifest.root} is a decoder-only model without a prompt template, so it "
                             "cannot summarise; use `swapmoe generate` with your own prompt, or export it from a "
                             "checkpoint folder whose swapmoe.json gives a prompt_template holding '{document}'.")
        return encode_prompts(self.tokenizer, texts, self.prompt_template, self.config.max_source_tokens,
                              self.manifest.root)

    def generate(self, input_ids: Sequence[Sequence[int]], max_new_tokens: int = 32, num_beams: int | None = None,
                 forced_ids: Sequence[Sequence[int]] | None = None, *, hook: MoEHook | None = None,
                 on_step: Callable[[int, Step], None] | None = None) -> list[Result]:
        """Generate for a batch of token-id rows (padded by the family's loop); one Result per row.

        ``num_beams``: the beam width; None takes the checkpoint's generation config's (1 if unset).
        Rows run together in chunks of at most ``max_source_tokens`` rows x beams x tokens
        (the envelope the baseline measured); each chunk is one request, and each Result's
        stats are its chunk's. ``forced_ids`` (greedy only, one row per input): decoder tokens
        fed instead of the model's choices, for benchmarks on random weights
        (generate.greedy_steps). ``hook``: around every sparse layer's MoE (split.MoEHook).
        ``on_step(first_row, step)``: after each step of a chunk whose first row is ``first_row``
        (greedy: ``step.tokens`` holds each of its rows' new token), for streaming.
        """
        limit = self.config.max_source_tokens
        num_beams = self.default_num_beams if num_beams is None else num_beams
        check_request(input_ids, max_new_tokens, num_beams, forced_ids, limit)
        results: list[Result] = []
        for chunk in chunks(input_ids, limit // num_beams):
            forced = None
            if forced_ids is not None:
                start = len(results)
                forced = np.array([list(r[:max_new_tokens]) for r in forced_ids[start: start + len(chunk)]], dtype=np.int64)
            decoding = Decoding(max_new_tokens, num_beams, self.no_repeat_ngram_size, forced)
            first = len(results)
            results += self._request(chunk, decoding, hook,
                                     None if on_step is None else (lambda step: on_step(first, step)))
        return results

    def _request(self, rows: Sequence[Sequence[int]], decoding: Decoding, hook: MoEHook | None,
                 on_step: Callable[[Step], None] | None = None) -> list[Result]:
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
                if on_step is not None:
                    on_step(step)
        stats = request_stats(p, meter, next(self._requests))  # before the boundary's round moves residents
        self._counted = meter.after
        p.policy.end_request()
        return [Result(None, list(map(int, row)), stats["exact"], dict(stats)) for row in step.sequences]

    def summarize(self, texts: Sequence[str], max_new_tokens: int = 32, num_beams: int | None = None, *,
                  hook: MoEHook | None = None) -> list[Result]:
        """Summaries of documents (``Result.summary``); a decoder-only model's through its prompt template."""
        ids, truncated = self.encode_documents(texts)
        results = self.generate(ids, max_new_tokens=max_new_tokens, num_beams=num_beams, hook=hook)
        return self._decoded(results, truncated)

    def generate_texts(self, texts: Sequence[str], max_new_tokens: int = 32, num_beams: int | None = None, *,
                       hook: MoEHook | None = None, on_step: Callable[[int, Step], None] | None = None) -> list[Result]:
        """Continuations of prompts as they are (``Result.summary`` holds the generated text, ``token_ids``
        its ids without the prompt); an encoder-decoder model reads each prompt as its encoder input."""
        ids, truncated = self.encode_texts(texts)
        results = self.generate(ids, max_new_tokens=max_new_tokens, num_beams=num_beams, hook=hook, on_step=on_step)
        return self._decoded(results, truncated)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()

    def _decoded(self, results: list[Result], truncated: list[bool]) -> list[Result]:
        for r, cut in zip(results, truncated):
            r.summary = self.decode(r.token_ids)
            r.stats["truncated_input"] = cut
        return results

    def residents_by_rung(self) -> dict[str, int]:
        return residents_by_rung(self.residents, self.sparse, self.manifest.expert_dtype)

    def encode_measured(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Texts as the measuring tools (profile, loss, traces) run them: what summarize runs, a
        decoder-only model's documents in its prompt template where it has one; else as they are."""
        return (self.encode_documents if self.prompt_template or not self.decoder_only else self.encode_texts)(texts)

    def profile_texts(self, texts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8) -> Profile:
        """Eq. 1 importance over calibration texts (generation included), observed on every layer."""
        tracker = ImportanceTracker(self.norms, self.family.top_k)  # Eq. 1 over each token's k choices
        hook = observe(lambda layer, normed, logits, mask: tracker.observe(
            layer.key, np.linalg.norm(normed, axis=-1), softmax(logits), mask))
        for i in range(0, len(texts), batch_size):
            ids, _ = self.encode_measured(texts[i: i + batch_size])
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
