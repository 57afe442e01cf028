"""The budgeted runtime: load an artifact, fit a memory budget, generate, report stats.

    rt = Runtime("artifact/", RuntimeConfig(policy="swapmoe", budget="33%"))
    results = rt.summarize(["long text ..."], max_new_tokens=32)
    rt.close()
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from swapmoe_edge.system import memory, pagecache
from swapmoe_edge.system.budget import BudgetSpec, MemoryMonitor, check_fits, parse_budget
from swapmoe_edge.core.units import format_size
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.system.devices import detect_profile, get_profile, provider_options, select_providers
from swapmoe_edge.core.errors import BudgetError, InputError
from swapmoe_edge.model.generate import beam_search, greedy_search
from swapmoe_edge.residency.importance import ImportanceTracker, Profile
from swapmoe_edge.artifact.manifest import Manifest, load_manifest
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.model.split import DecoderState, SplitModel
from swapmoe_edge.model.placement import DeviceKernel, PlacingStore, resolve_placement
from swapmoe_edge.residency.ladder_plan import measured_quality
from swapmoe_edge.residency.ladder_policy import LadderPolicy
from swapmoe_edge.model.prepacked import PrepackedStore
from swapmoe_edge.residency.planner import plan_counts
from swapmoe_edge.residency.policies_old import Policy, make_policy
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.model.rungs import measure_ladders, rung_runners
from swapmoe_edge.model.sessions import DenseSessions
from swapmoe_edge.artifact.store import ExpertStore, LoadedExpert, StartupPrefetch

log = logging.getLogger(__name__)
PROFILE_NAME = "profile.json"


@dataclass
class Result:
    summary: str | None
    token_ids: list[int]
    exact: bool
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Decoder:
    """Adapts the split model to the search functions' step/reorder protocol."""

    def __init__(self, model: SplitModel):
        self.model = model

    def step(self, state: DecoderState, next_ids: np.ndarray):
        logits, state = self.model.decode(next_ids.reshape(-1, 1), state)  # [N, 1, V]
        return logits[:, -1, :], state

    def reorder(self, state: DecoderState, index: np.ndarray) -> DecoderState:
        return state.reorder(index)


def _chunks(rows: Sequence[Sequence[int]], max_cells: int) -> list[Sequence[Sequence[int]]]:
    """Consecutive groups of rows whose (count x longest length) stays within ``max_cells``."""
    out, start, width = [], 0, 0
    for i, row in enumerate(rows):
        width = max(width, len(row))
        if i > start and (i - start + 1) * width > max_cells:
            out.append(rows[start:i])
            start, width = i, len(row)
    out.append(rows[start:])
    return out


# Generation settings that change HF's output and that generate.py does not implement, with
# the values at which they do nothing.
_UNSUPPORTED_GENERATION = {"repetition_penalty": 1.0, "min_length": 0, "min_new_tokens": None,
                           "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "forced_bos_token_id": None,
                           "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                           "do_sample": False}


def _generation_settings(generation: dict[str, Any]) -> int:
    """The checkpoint's ``no_repeat_ngram_size``; warns about settings this runtime ignores."""
    ignored = {k: generation[k] for k, neutral in _UNSUPPORTED_GENERATION.items()
               if generation.get(k) not in (None, neutral, [])}
    if ignored:
        warnings.warn(f"the checkpoint's generation config sets {ignored}, which this runtime does not apply: "
                      "its outputs will differ from Hugging Face generate (greedy/beam search and "
                      "no_repeat_ngram_size are supported)", stacklevel=3)
    n = generation.get("no_repeat_ngram_size") or 0
    if not isinstance(n, int) or n < 0:
        raise InputError(f"generation config: no_repeat_ngram_size must be a non-negative integer, not {n!r}")
    return n


class Runtime:
    def __init__(self, artifact: str | Path, config: RuntimeConfig = RuntimeConfig(), *,
                 store: ExpertStore | None = None, available_fn: Callable[[], int] | None = None,
                 rss_fn: Callable[[], int] | None = None, profile: Profile | None = None):
        self._t0 = time.perf_counter()
        self.startup: dict[str, float] = {}  # seconds per start-up phase (a device reads each from flash)
        self.manifest: Manifest = load_manifest(artifact)
        self.config = self._settle_config(config)
        self.sparse = [lay.key for lay in self.manifest.sparse_layers()]
        self._choose_device()  # providers, threads, reserve, expert placement, budget spec
        self.norms = self._expert_norms()  # ||E|| per layer: prune's order, Eq. 1's factor
        self.profile = profile or self._load_profile()
        self.store = store or ExpertStore(self.manifest, verify=self.config.verify, read_mode=self.config.read_mode)
        prefetch = self._start_prefetch()  # dense files and first experts read while sessions build
        self._open_sessions(prefetch)  # dense sessions, expert kernels, low-bit runners, tokenizer
        self._settle_budget(prefetch, available_fn, rss_fn)  # expert costs, baseline, memory monitor
        self.policy = self._make_policy(self._plan(self.budget_bytes, strict=True))
        self.model = SplitModel(self.manifest, self.sessions, self.policy)
        self._start(prefetch)  # the start set resident, the policy's thread and the monitor running

    # -- start-up, in the order __init__ runs it ---------------------------------------------------
    def _settle_config(self, config: RuntimeConfig) -> RuntimeConfig:
        if config.max_source_tokens is None:
            config = replace(config, max_source_tokens=int(self.manifest.extra.get("max_source_tokens", 512)))
        if config.max_source_tokens < 1:
            raise InputError(f"max_source_tokens must be at least 1, not {config.max_source_tokens}")
        return config

    def _expert_norms(self) -> dict[LayerKey, np.ndarray]:
        m = self.manifest
        return {lk: np.array([m.experts[k].norm for k in m.layer(lk.stack, lk.layer).experts]) for lk in self.sparse}

    def _choose_device(self) -> None:
        """The device profile's providers, threads and reserve, unless the config sets them."""
        config = self.config
        self.device = get_profile(config.device) if config.device else detect_profile()
        self.providers, self.device_messages = select_providers(self.device)
        for msg in self.device_messages:
            log.warning(msg)
        self.threads = config.threads if config.threads is not None else self.device.threads
        self.reserve_bytes = config.reserve_bytes if config.reserve_bytes is not None else self.device.reserve_bytes
        self.placement, self._ort_device = resolve_placement(config.expert_placement, self.providers)
        self.spec: BudgetSpec = parse_budget(config.budget)
        # On a discrete GPU the CUDA arena stops at the profile's limit, else at a byte budget.
        gpu_cap = self.spec.nbytes if self.spec.kind == "bytes" and not self.device.unified_memory else None
        self.provider_options = provider_options(self.device, gpu_cap)

    def _start_prefetch(self) -> StartupPrefetch | None:
        """With a background cold start: read ahead the dense files and each layer's first
        expert (I/O) while ORT builds sessions (CPU); on a device the two overlap instead of adding up."""
        m, config = self.manifest, self.config
        self._dense_files = [rel for rel in m.files if not rel.startswith("experts/")]
        if config.cold_start != "background" or not isinstance(self.store, ExpertStore):
            return None
        first = self.norms if config.policy == "prune" else self.profile.importance
        # Embedding tables are gathered row by row from ORT's lazy mapping: a request reads
        # only the rows of its tokens (of 2 x 99 MB at switch-base size), so they stay on flash.
        lazy = {f for sg in m.subgraphs.values() if sg.name.endswith(".embed") for f in (sg.file, sg.file + ".data")}
        # The ladder starts from low-bit copies, not from these experts: only the dense files for it.
        ahead = [] if config.policy == "ladder" else \
            [m.layer(lk.stack, lk.layer).experts[int(np.argmax(first[lk]))] for lk in self.sparse]
        return StartupPrefetch(self.store, [m.path(rel) for rel in self._dense_files if rel not in lazy], ahead)

    def _open_sessions(self, prefetch: StartupPrefetch | None) -> None:
        m, config = self.manifest, self.config
        self.sessions = DenseSessions(m, threads=self.threads, providers=self.providers,
                                      provider_options=self.provider_options)
        self.sessions.load_all()
        self.startup["dense_sessions_s"] = time.perf_counter() - self._t0  # since the constructor began
        if prefetch is not None:
            prefetch.dense_done.wait()
        self.kernel_session = self.sessions.get("expert_kernel")
        self.runners = rung_runners(m, config, self.sessions, self.threads, list(self.providers), self.placement) \
            if config.policy == "ladder" else {}
        self.device_kernel = DeviceKernel(self.kernel_session, self._ort_device) if self.placement == "device" else None
        if self.device_kernel is not None:
            self.store = PlacingStore(self.store, self.device_kernel)
        self.residents = ResidentSet(self.sparse, m.config.num_experts)
        self.tokenizer = self._load_tokenizer()
        self.no_repeat_ngram_size = _generation_settings(m.generation)
        self._request_ids = itertools.count()
        self._served = False

    def _settle_budget(self, prefetch: StartupPrefetch | None, available_fn, rss_fn) -> None:
        """What an expert costs resident, the measured baseline, and the first live budget."""
        m, config = self.manifest, self.config
        self.expert_cost = {lk: m.experts[m.layer(lk.stack, lk.layer).experts[0]].nbytes for lk in self.sparse}
        # before the baseline: the cost measurement settles which stacks run the standard kernel
        self.rungs = measure_ladders(self.runners, self.store, self.expert_cost, config.ladder_primary,
                                     m.expert_dtype) if self.runners else {}
        if self.rungs and self.profile.rung_loss:  # rung qualities measured on the output (profile --measure-loss)
            self.rungs = measured_quality(self.rungs, self.profile.importance, self.profile.loss, self.profile.rung_loss)
        t1 = time.perf_counter()
        if prefetch is not None and not config.baseline_cache:
            prefetch.join()  # a measured baseline subtracts the prefetched experts: they must all be in
        self.baseline = self._baseline(self.threads)
        self.startup["baseline_s"] = time.perf_counter() - t1
        total_experts = sum(e.nbytes for e in m.experts.values())
        self.prepacked = self._use_prepacked(self.threads)
        if self.prepacked:  # every expert costs what one measured prepacked session added to RSS
            cost = self.store.measure_cost(next(iter(m.experts)))
            self.expert_cost = {lk: cost for lk in self.sparse}
            total_experts = cost * len(m.experts)
        self.cap = self.spec.process_cap(self.baseline, total_experts)
        self.monitor = MemoryMonitor(self.cap, reserve=self.reserve_bytes, period_s=config.monitor_period_s,
                                     on_change=None, available_fn=available_fn, rss_fn=rss_fn)
        first = self.monitor.sample_once()
        self.budget_bytes, self.budget_source = first.budget, first.source

    def _start(self, prefetch: StartupPrefetch | None) -> None:
        t1 = time.perf_counter()
        if prefetch is not None:
            prefetch.join()
        self.policy.warm(background=self.config.cold_start == "background")
        if isinstance(self.store, ExpertStore):
            self.store.drop_prefetched()  # what the start set did not take would be held uncounted
        self.startup["warm_s"] = time.perf_counter() - t1
        self.policy.start()
        self.monitor.on_change = self._on_budget  # residents exist now: budget moves may resize them
        self.monitor.start()

    # -- setup ------------------------------------------------------------------------------
    def _load_tokenizer(self):
        if not self.manifest.tokenizer:
            return None
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.manifest.path(self.manifest.tokenizer)))
        tok.no_padding()
        return tok

    def _load_profile(self) -> Profile:
        path = self.manifest.root / PROFILE_NAME
        if path.is_file():
            prof = Profile.load(path)
            prof.check_layers({lk: self.manifest.config.num_experts for lk in self.sparse})
            return prof
        return Profile.from_norms(self.norms)

    def _baseline(self, threads: int | None) -> int:
        """The measured baseline, or the one an earlier process measured (``config.baseline_cache``)."""
        if not self.config.baseline_cache:
            return self._measure_baseline()
        from swapmoe_edge.runtime import baseline_cache

        key = baseline_cache.cache_key(self.manifest.root / "manifest.json", tokens=self.config.max_source_tokens,
                                       threads=threads, providers=list(self.providers), placement=self.placement,
                                       margin=self.config.activation_margin, cpus=os.cpu_count())
        rss = memory.current_rss() - getattr(self.store, "prefetched_bytes", 0)
        cached = baseline_cache.lookup(key, rss)
        if cached is not None:
            self.startup["baseline_cached"] = 1.0
            return cached
        measured = self._measure_baseline()
        baseline_cache.store(key, measured, rss)
        return measured

    def _measure_baseline(self) -> int:
        """Peak RSS of a warm-up pass with every dense session loaded, experts excluded.

        The pass encodes one row of ``max_source_tokens`` tokens: generate() never runs more
        rows x beams x tokens at once (it chunks bigger batches), so the activations of any
        request fit in what this pass measured. With a 64-token warm-up, batches of eight
        300-token documents went 40% over budget on a 17M-parameter model.

        The pass runs the expert kernel too (on one zero expert), because its working
        buffers (packing, intermediates) are part of every request's peak: measured after
        the fact, RSS missed ~70 MB of them at switch-base size and peaks went 6% over budget.
        """
        c = self.manifest.config
        entry = next(iter(self.manifest.experts.values()))
        dummy = LoadedExpert(entry.key, {t.role: np.zeros(t.shape, dtype=t.dtype) for t in entry.tensors}, entry.nbytes)
        dummy_bytes = sum(a.nbytes for a in dummy.feeds.values())
        if self.device_kernel is not None:
            dummy = self.device_kernel.place(dummy)

        # Low-bit copies run on the standard-op kernel dequantise on every call: its buffers are
        # part of every request's peak too (MatMulNBits sessions are measured per copy instead).
        standard = [(r, {t.role: np.zeros(t.shape, dtype=t.dtype) for t in entry.rungs[name].tensors})
                    for name, r in self.runners.items() if "standard" in r.modes.values()]

        def moe(layer, normed, logits, mask):
            flat = np.ascontiguousarray(normed.reshape(-1, normed.shape[-1]))  # [B*T, D]: every token through one expert
            for runner, feeds in standard:
                self.sessions.run(runner.info.kernel, {"x": flat, **feeds})
            return self._kernel(dummy, flat).reshape(normed.shape) * 0

        warm = SplitModel(self.manifest, self.sessions, moe)
        # ORT memory-maps big external initializers; the embedding table's pages become
        # resident only as token ids touch them (60 MB on one random 64-token input at
        # switch-base size). Touch every row now, so that the baseline counts the table.
        for name in ("enc.embed", "dec.embed"):
            for start in range(0, c.vocab_size, 4096):
                ids = np.arange(start, min(start + 4096, c.vocab_size), dtype=np.int64)[None, :]
                self.sessions.run(name, {"input_ids": ids})
        memory.reset_peak_rss()
        ids = np.full((1, self.config.max_source_tokens), 2, dtype=np.int64)
        state = warm.start_decoder(warm.encode(ids, np.ones_like(ids)), np.ones_like(ids))
        warm.decode(np.full((1, 1), c.decoder_start_token_id, dtype=np.int64), state)
        held = getattr(self.store, "prefetched_bytes", 0)  # read ahead for the warm start: experts, not baseline
        peak = memory.peak_rss() - dummy_bytes - held
        dummy.feeds.clear()  # the zero expert is not part of the baseline
        del state
        memory.trim()
        base = max(peak, memory.current_rss() - held)
        return int(base * (1 + self.config.activation_margin))

    def _use_prepacked(self, threads: int | None) -> bool:
        """Swap the store for prepacked sessions when the config asks for them and they fit the case."""
        want = self.config.prepack_experts
        if want == "off" or (want == "auto" and self.config.policy != "full"):
            return False
        why = None
        if self.placement != "host":
            why = "experts are placed on the device"
        elif self.manifest.expert_dtype != "float32":
            why = f"experts are {self.manifest.expert_dtype} (ORT would fold them to float32 constants)"
        if why:
            if want == "on":
                raise InputError(f"prepack_experts=on cannot be used: {why}. Use prepack_experts=auto or off.")
            return False
        self.store = PrepackedStore(self.store, threads, self.providers)
        return True

    def _kernel(self, expert: LoadedExpert, x: np.ndarray) -> np.ndarray:
        if expert.rung is not None:
            return self.runners[expert.rung].run(expert, x)
        if expert.session is not None:
            return expert.session.run(None, {"x": x})[0]
        if self.device_kernel is not None:
            return self.device_kernel.run(expert, x)
        return self.kernel_session.run(None, {"x": x, **expert.feeds})[0]

    def _ladder_capacity(self, budget: int, strict: bool) -> int:
        """Bytes for expert copies under ``budget``; strict: fail unless one lowest copy per layer fits."""
        lowest = [self.rungs[lk][0].cost for lk in self.sparse]
        if strict:
            return check_fits(budget, self.baseline, lowest)
        return max(budget - self.baseline, sum(lowest))

    def _plan(self, budget: int, strict: bool) -> dict[LayerKey, int]:
        E = self.manifest.config.num_experts
        if self.config.policy == "ladder":
            return {lk: 0 for lk in self.sparse}  # placed by bytes (LadderPolicy), not counts
        if self.config.policy == "full":
            need = self.baseline + sum(self.expert_cost[lk] * E for lk in self.sparse)
            if strict and budget < need:
                raise BudgetError(
                    f"the full policy keeps every expert resident: it needs {format_size(need)} "
                    f"(baseline {format_size(self.baseline)} + experts {format_size(need - self.baseline)}), "
                    f"the budget is {format_size(budget)}. Use another policy or a larger budget."
                )
            return {lk: E for lk in self.sparse}
        per_layer = [self.expert_cost[lk] for lk in self.sparse]
        # No room is kept for an expert in flight: swapmoe's swapper evicts before it reads
        # (SwapMoEPolicy.begin), so every approximate policy holds the same number of experts.
        if strict:
            capacity = check_fits(budget, self.baseline, per_layer)
        else:
            capacity = max(budget - self.baseline, sum(per_layer))  # never below one per layer
        importance = self.norms if self.config.policy == "prune" else dict(self.profile.importance)
        loss = self.profile.loss if self.config.policy == "swapmoe" else None  # measured curves: masked routing's
        return plan_counts(importance, self.expert_cost, capacity, method=self.config.planner,
                           layer_weight=self.config.layer_weights(self.sparse), loss=loss)

    def _make_policy(self, counts) -> Policy:
        ladder = None
        if self.config.policy == "ladder":
            ladder = dict(rungs=self.rungs, runners=self.runners,
                          capacity_bytes=self._ladder_capacity(self.budget_bytes, strict=True),
                          bytes_per_interval=self.config.max_swaps_per_interval * max(self.expert_cost.values()))
        return make_policy(self.config, self.residents, self.store, self._kernel, self.manifest.config.expert_capacity,
                           counts, self.norms, self.profile, ladder)

    def _on_budget(self, budget: int) -> None:
        """Monitor thread: the live budget moved; shrink residents now (growth is lazy)."""
        self.budget_bytes = budget
        last = self.monitor.last_sample()
        self.budget_source = last.source if last is not None else self.budget_source
        if self.config.policy == "full":
            if budget < self.baseline + self.residents.nbytes:
                log.warning("full policy is over the live budget (%s); it cannot shrink", format_size(budget))
            return
        if isinstance(self.policy, LadderPolicy):
            self.policy.set_capacity(self._ladder_capacity(budget, strict=False))
            return
        self.policy.resize(self._plan(budget, strict=False))

    # -- inputs -------------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        if self.tokenizer is None:
            raise InputError(f"artifact {self.manifest.root} has no tokenizer.json; pass token ids instead of text.")
        ids, truncated = [], []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"input {i + 1} is empty; give some text to summarise.")
            row = self.tokenizer.encode(text).ids
            cut = len(row) > self.config.max_source_tokens
            if cut:
                warnings.warn(f"input {i + 1} has {len(row)} tokens; truncated to the model's limit of "
                              f"{self.config.max_source_tokens}", stacklevel=3)
                row = row[: self.config.max_source_tokens - 1] + row[-1:]  # keep the closing </s>
            ids.append(row)
            truncated.append(cut)
        return ids, truncated

    # -- generation -----------------------------------------------------------------------------
    def generate(self, input_ids: Sequence[Sequence[int]], max_new_tokens: int = 32, num_beams: int = 1,
                 forced_ids: Sequence[Sequence[int]] | None = None) -> list[Result]:
        """Generate for a batch of token-id rows (padded here); one Result per row.

        Rows run together in chunks of at most ``max_source_tokens`` rows x beams x tokens
        (the envelope the baseline measured); each Result's stats are its chunk's.
        ``forced_ids`` (greedy only, one row per input): decoder tokens fed instead of the
        model's choices, for benchmarks on random weights (generate.greedy_search).
        """
        if forced_ids is not None:
            if num_beams != 1 or len(forced_ids) != len(input_ids):
                raise InputError("forced_ids needs num_beams=1 and one row per input")
            if any(len(f) < max_new_tokens for f in forced_ids):
                raise InputError(f"every forced_ids row needs at least max_new_tokens ({max_new_tokens}) tokens")
        if not input_ids or any(len(r) == 0 for r in input_ids):
            raise InputError("every input needs at least one token")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if num_beams < 1:
            raise InputError(f"num_beams must be at least 1, not {num_beams}")
        limit = self.config.max_source_tokens
        longest = max(range(len(input_ids)), key=lambda i: len(input_ids[i]))
        if len(input_ids[longest]) > limit:
            raise InputError(f"input {longest + 1} has {len(input_ids[longest])} tokens, more than max_source_tokens "
                             f"({limit}); truncate it or raise max_source_tokens (the budget's baseline grows with it).")
        if num_beams > limit:
            raise InputError(f"num_beams {num_beams} exceeds max_source_tokens ({limit}), the activation envelope")
        results: list[Result] = []
        for chunk in _chunks(input_ids, limit // num_beams):
            forced = None
            if forced_ids is not None:
                start = len(results)
                forced = np.array([list(r[:max_new_tokens]) for r in forced_ids[start: start + len(chunk)]], dtype=np.int64)
            results += self._generate_chunk(chunk, max_new_tokens, num_beams, forced)
        return results

    def _generate_chunk(self, input_ids: Sequence[Sequence[int]], max_new_tokens: int, num_beams: int,
                        forced: np.ndarray | None = None) -> list[Result]:
        c = self.manifest.config
        b, s = len(input_ids), max(len(r) for r in input_ids)
        ids = np.full((b, s), c.pad_token_id, dtype=np.int64)
        mask = np.zeros((b, s), dtype=np.int64)
        for i, row in enumerate(input_ids):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        before = (self.policy.counters.snapshot(), self.store.counters())
        memory.reset_peak_rss()
        times: list[float] = []
        first_ever = not self._served
        self.policy.background_io.clear()  # see Policy.background_io: no background reads during prefill

        def on_token(step: int) -> None:
            times.append(time.perf_counter())
            if step == 0:
                self.policy.background_io.set()
                if first_ever:
                    self._served = True
                    self._drop_dense_cache()

        t0 = time.perf_counter()
        try:
            enc = self.model.encode(ids, mask, None)
            state = self.model.start_decoder(enc, mask)
            kw = dict(start_id=c.decoder_start_token_id, eos_id=c.eos_token_id, pad_id=c.pad_token_id,
                      max_new_tokens=max_new_tokens, on_token=on_token,
                      no_repeat_ngram_size=self.no_repeat_ngram_size)
            if num_beams > 1:
                out = beam_search(_Decoder(self.model), state, b, num_beams=num_beams, **kw)
            else:
                out = greedy_search(_Decoder(self.model), state, b, forced=forced, **kw)
        finally:
            self.policy.background_io.set()  # never left closed by a failed request
        self.policy.end_request()
        stats = self._stats(t0, times, before)
        return [Result(None, list(map(int, row)), stats["exact"], dict(stats)) for row in out]

    def summarize(self, texts: Sequence[str], max_new_tokens: int = 32, num_beams: int = 1) -> list[Result]:
        ids, truncated = self.encode_texts(texts)
        results = self.generate(ids, max_new_tokens=max_new_tokens, num_beams=num_beams)
        for r, cut in zip(results, truncated):
            r.summary = self.tokenizer.decode(r.token_ids, skip_special_tokens=True).strip()
            r.stats["truncated_input"] = cut
        return results

    def _stats(self, t0: float, times: list[float], before) -> dict[str, Any]:
        pol0, io0 = before
        pol1, io1 = self.policy.counters.snapshot(), self.store.counters()
        ttft = (times[0] - t0) if times else 0.0
        decode = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        routed = pol1["routed"] - pol0["routed"]
        first_choice = (pol1["first_choice_resident"] - pol0["first_choice_resident"]) / routed if routed else 1.0
        # An approximate policy gave full's tokens if every token, padding included, found its
        # first choice resident (routing and capacity as full's) and the gate was not
        # renormalised; rounded or quantised experts never do.
        lowbit = pol1["lowbit_tokens"] - pol0["lowbit_tokens"]
        as_full = pol1["rerouted"] == pol0["rerouted"] and not self.config.renormalize and lowbit == 0
        exact = (self.policy.exact or as_full) and not self.manifest.expert_dtype_lossy
        return {
            "policy": self.config.policy,
            "device": self.device.name,
            "providers": list(self.providers),
            "expert_placement": self.placement,
            "prepacked_experts": self.prepacked,
            "ttft_ms": ttft * 1e3,
            "decode_ms_per_token": decode * 1e3,
            "request_ms": ((times[-1] if times else time.perf_counter()) - t0) * 1e3,
            "steps": len(times),
            "request": next(self._request_ids),  # one number per chunk that ran: rows sharing it shared these stats
            "peak_rss_bytes": memory.peak_rss(),
            "budget_bytes": int(self.budget_bytes) if self.budget_bytes is not None else None,
            "budget_source": self.budget_source,
            "baseline_bytes": self.baseline,
            "resident_expert_bytes": self.residents.nbytes,
            "residents": self.residents.counts(),
            "bytes_read": int(io1["bytes_read"] - io0["bytes_read"]),
            "loads": int(pol1["loads"] - pol0["loads"]),
            "swaps": int(pol1["swaps"] - pol0["swaps"]),
            "stall_ms": (pol1["stall_s"] - pol0["stall_s"]) * 1e3,
            "first_choice_resident": first_choice,
            "low_precision_tokens": int(lowbit),  # ran a low-bit copy of their expert (ladder; lossy)
            "residents_by_rung": self.residents_by_rung(),
            "unavailable_experts": sorted(k.name for k in self.residents.unavailable),
            "exact": exact,
            "expert_dtype": self.manifest.expert_dtype,
        }

    def residents_by_rung(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lk in self.sparse:
            for ex in self.residents.layer(lk).values():
                name = ex.rung or self.manifest.expert_dtype
                out[name] = out.get(name, 0) + 1
        return out

    # -- profile ------------------------------------------------------------------------------------
    def profile_texts(self, texts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8) -> Profile:
        """Eq. 1 importance over calibration texts (generation included), observed on every layer."""
        tracker = ImportanceTracker(self.norms)
        inner = self.model.moe

        def observing(layer, normed, logits, mask):
            from swapmoe_edge.model.moe import softmax

            tracker.observe(layer.key, np.linalg.norm(normed, axis=-1), softmax(logits), mask)
            return inner(layer, normed, logits, mask)

        self.model.moe = observing
        try:
            for i in range(0, len(texts), batch_size):
                ids, _ = self.encode_texts(texts[i: i + batch_size])
                self.generate(ids, max_new_tokens=max_new_tokens)
        finally:
            self.model.moe = inner
        return replace(Profile.from_tracker(tracker, {"texts": len(texts), "max_new_tokens": max_new_tokens}), source="profile")

    def _drop_dense_cache(self) -> None:
        """After the first token ORT has mapped or copied every dense page it needs; the rest
        of the dense files' cached pages would only count against a device's memory limit.
        (Dropped earlier, pages ORT maps lazily had to come off flash again in the first request.)"""
        pagecache.drop(self.manifest.path(rel) for rel in self._dense_files)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a background cold start has filled the start set (True) or ``timeout`` passed."""
        return self.policy.wait_filled(timeout)

    def close(self) -> None:
        self.monitor.stop()
        self.policy.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
