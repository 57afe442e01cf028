"""Loading: an artifact and a config in, plain parts out.

    parts = load("artifact/", RuntimeConfig(policy="swapmoe", budget="33%"))

``load`` brings a budgeted runtime up: the device's providers, the dense sessions, the expert
path with the variants the config asks for (transforms, experts.py), the measured baseline, the
live budget, the residents and the policy, the model; the start set resident and the policy's
thread and the memory monitor running. ``Runtime`` is a facade over what it returns.

``load_model`` stops before the budget: the model and what runs it, every expert read on first
use and kept, no monitor and no thread. Tools that only run the model (a benchmark, a
teacher-forced loss) take that.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from swapmoe_edge.artifact.files import check_inside
from swapmoe_edge.artifact.manifest import Manifest, load_manifest
from swapmoe_edge.artifact.store import ExpertStore, StartupPrefetch
from swapmoe_edge.artifact.verify import HashCache, checked_at_load, verify_files
from swapmoe_edge.core.errors import BudgetError, InputError
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.model.families import Family, family_of
from swapmoe_edge.model.placement import resolve_placement
from swapmoe_edge.model.rungs import rung_runners
from swapmoe_edge.model.sessions import DenseSessions
from swapmoe_edge.model.split import MoEFn, MoEHook
from swapmoe_edge.residency.importance import PROFILE_NAME, Profile
from swapmoe_edge.residency.engine import Engine
from swapmoe_edge.residency.policies import policy_class
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.runtime import baseline as baseline_mod
from swapmoe_edge.runtime import baseline_cache
from swapmoe_edge.runtime import experts as ex
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.runtime.experts import Experts
from swapmoe_edge.runtime.fit import Fit
from swapmoe_edge.runtime.requests import generation_settings
from swapmoe_edge.system.budget import BudgetSpec, MemoryMonitor, parse_budget
from swapmoe_edge.system.devices import DeviceProfile, detect_profile, get_profile, provider_options, select_providers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    """The machine as the config and the device profile settle it."""

    profile: DeviceProfile
    providers: list[str]  # ONNX Runtime execution providers, in order
    messages: list[str]  # why a profile's provider is not used here
    threads: int | None
    reserve_bytes: int  # kept free for the rest of the system
    placement: str  # where resident experts live: host | device
    ort_device: str
    spec: BudgetSpec
    provider_options: dict[str, dict[str, str]]


@dataclass(frozen=True)
class ModelParts:
    """What runs the model, with no budget."""

    manifest: Manifest
    config: RuntimeConfig  # settled: max_source_tokens filled in
    family: Family
    device: Device
    sessions: DenseSessions
    tokenizer: Tokenizer | None
    experts: Experts
    sparse: tuple[LayerKey, ...]
    norms: dict[LayerKey, np.ndarray]  # ||E|| per layer: prune's order, Eq. 1's factor
    profile: Profile
    model: object  # the family's model (SplitModel for Switch)
    no_repeat_ngram_size: int  # the checkpoint's generation setting


@dataclass(frozen=True)
class Parts(ModelParts):
    """A budgeted runtime's parts: the model's, and the residents, the policy and the budget."""

    residents: ResidentSet
    policy: Engine  # the residency engine running the configured policy
    fit: Fit  # the baseline, the monitor and the live budget
    dense_files: tuple[str, ...]
    startup: dict[str, float]  # seconds per start-up phase (a device reads each from flash)

    def close(self) -> None:
        """Stop the memory monitor and the policy's threads."""
        self.fit.monitor.stop()
        self.policy.stop()


def settle_config(config: RuntimeConfig, manifest: Manifest) -> RuntimeConfig:
    if config.max_source_tokens is None:
        config = replace(config, max_source_tokens=int(manifest.extra.get("max_source_tokens", 512)))
    if config.max_source_tokens < 1:
        raise InputError(f"max_source_tokens must be at least 1, not {config.max_source_tokens}")
    return config


def choose_device(config: RuntimeConfig) -> Device:
    """The device profile's providers, threads and reserve, unless the config sets them."""
    profile = get_profile(config.device) if config.device else detect_profile()
    providers, messages = select_providers(profile)
    for msg in messages:
        log.warning(msg)
    placement, ort_device = resolve_placement(config.expert_placement, providers)
    spec = parse_budget(config.budget)
    # On a discrete GPU the CUDA arena stops at the profile's limit, else at a byte budget.
    gpu_cap = spec.nbytes if spec.kind == "bytes" and not profile.unified_memory else None
    return Device(profile, providers, messages,
                  threads=config.threads if config.threads is not None else profile.threads,
                  reserve_bytes=config.reserve_bytes if config.reserve_bytes is not None else profile.reserve_bytes,
                  placement=placement, ort_device=ort_device, spec=spec,
                  provider_options=provider_options(profile, gpu_cap))


def expert_norms(manifest: Manifest, sparse) -> dict[LayerKey, np.ndarray]:
    return {lk: np.array([manifest.experts[k].norm for k in manifest.layer(lk.stack, lk.layer).experts]) for lk in sparse}


def load_profile(manifest: Manifest, sparse, norms) -> Profile:
    """The artifact's importance profile, or one made from the experts' norms."""
    path = check_inside(manifest.root, PROFILE_NAME, "the importance profile")
    if path.is_file():
        prof = Profile.load(path)
        prof.check_layers({lk: manifest.config.num_experts for lk in sparse})
        return prof
    return Profile.from_norms(norms)


def load_tokenizer(manifest: Manifest) -> Tokenizer | None:
    if not manifest.tokenizer:
        return None
    tok = Tokenizer.from_file(str(manifest.path(manifest.tokenizer)))
    tok.no_padding()
    return tok


def _start_prefetch(manifest: Manifest, config: RuntimeConfig, family: Family, store, norms, profile,
                    sparse, dense_files) -> StartupPrefetch | None:
    """With a background cold start: read ahead the dense files and each layer's first
    expert (I/O) while ORT builds sessions (CPU); on a device the two overlap instead of adding up."""
    m = manifest
    if config.cold_start != "background" or not isinstance(store, ExpertStore):
        return None
    first = policy_class(config.policy).start_order(norms, profile)
    lazy = family.embedding_files(m)  # read row by row as requests touch them: they stay on flash
    # A policy that starts from low-bit copies (None) takes none of these experts: only the dense files.
    ahead = [] if first is None else \
        [m.layer(lk.stack, lk.layer).experts[int(np.argmax(first[lk]))] for lk in sparse]
    return StartupPrefetch(store, [m.path(rel) for rel in dense_files if rel not in lazy], ahead)


def _expert_path(manifest: Manifest, config: RuntimeConfig, device: Device, sessions: DenseSessions, store) -> Experts:
    """The shared kernel, placed where the device puts experts, with the ladder's rungs for a policy that uses them."""
    experts = ex.place(ex.shared_kernel(manifest, store, sessions), device.placement, device.ort_device, sessions)
    experts = ex.int4_sessions(experts, manifest, config.lowbit_kernel, device.threads, list(device.providers))
    if policy_class(config.policy).uses_rungs:
        experts = ex.with_rungs(experts, rung_runners(manifest, config, sessions, device.threads,
                                                      list(device.providers), device.placement))
    return experts


def verify_dense(manifest: Manifest, config: RuntimeConfig, family: Family) -> float:
    """Check every file the runtime opens whole (graphs, their data, the tokenizer) against the
    manifest's sha256 before anything reads it; seconds taken. ``verify="first"`` remembers good
    files by identity across processes (a later launch only stats them), ``"always"`` hashes
    them on every launch, ``"never"`` trusts them. Experts are checked as they are read."""
    t0 = time.perf_counter()
    if config.verify != "never":
        cache = HashCache(baseline_cache.hash_cache_path() if config.verify == "first" else None)
        verify_files(manifest, checked_at_load(manifest), cache, drop_pages=family.embedding_files(manifest))
    return time.perf_counter() - t0


def _in_share_terms(e: BudgetError, spec: BudgetSpec, baseline: int, total_experts: int) -> BudgetError:
    """A share budget's BudgetError with the smallest share that serves, beside the bytes."""
    minimum = getattr(e, "minimum", None)
    if spec.kind != "share" or minimum is None or total_experts <= 0:
        return e
    pct = math.ceil(100 * (minimum - baseline) / total_experts)
    return BudgetError(f"{e} As a share of the expert bytes ({spec} asked): at least {pct}%.") if pct <= 100 else e


def _open(artifact: str | Path, config: RuntimeConfig, profile: Profile | None):
    manifest = load_manifest(artifact)
    config = settle_config(config, manifest)
    family = family_of(manifest)
    family.check(manifest)
    verified_s = verify_dense(manifest, config, family)
    sparse = tuple(lay.key for lay in manifest.sparse_layers())
    norms = expert_norms(manifest, sparse)
    return manifest, config, family, choose_device(config), sparse, norms, \
        profile or load_profile(manifest, sparse, norms), verified_s


def load(artifact: str | Path, config: RuntimeConfig = RuntimeConfig(), *, store: ExpertStore | None = None,
         available_fn=None, rss_fn=None, profile: Profile | None = None, moe_hook: MoEHook | None = None) -> Parts:
    """A running, budgeted runtime's parts (stop them with ``Parts.close``).

    ``store``: read experts through this one (tests inject slow or failing flash);
    ``available_fn``/``rss_fn``: the monitor's memory readings; ``profile``: instead of the
    artifact's; ``moe_hook``: around every sparse layer of the model (split.MoEHook).
    """
    t0 = time.perf_counter()
    startup: dict[str, float] = {}
    manifest, config, family, device, sparse, norms, profile, startup["verify_s"] = _open(artifact, config, profile)
    store = store or ExpertStore(manifest, verify=config.verify, read_mode=config.read_mode)
    dense_files = tuple(rel for rel in manifest.files if not rel.startswith("experts/"))
    baseline_mod.check_dense_fits(manifest, dense_files, device.providers, available_fn, rss_fn)
    prefetch = _start_prefetch(manifest, config, family, store, norms, profile, sparse, dense_files)
    sessions = DenseSessions(manifest, threads=device.threads, providers=device.providers,
                             provider_options=device.provider_options)
    sessions.load_all()
    startup["dense_sessions_s"] = time.perf_counter() - t0 - startup["verify_s"]
    if prefetch is not None:
        prefetch.dense_done.wait()
    experts = _expert_path(manifest, config, device, sessions, store)
    residents = ResidentSet(sparse, manifest.config.num_experts)
    tokenizer = load_tokenizer(manifest)
    no_repeat = generation_settings(manifest.generation)

    # What an expert costs resident, the measured baseline, and the first live budget.
    if experts.runners:  # before the baseline: the cost measurement settles which stacks run the standard kernel
        experts = ex.measure_rungs(experts, config.ladder_primary, manifest.expert_dtype)
    t1 = time.perf_counter()
    if prefetch is not None and not config.baseline_cache:
        prefetch.join()  # a measured baseline subtracts the prefetched experts: they must all be in
    baseline, cached = baseline_mod.baseline(manifest, config, family, sessions, experts, device.threads,
                                             device.providers)
    if cached:
        startup["baseline_cached"] = 1.0
    startup["baseline_s"] = time.perf_counter() - t1
    if ex.prepacking(experts, config.prepack_experts, config.policy, manifest):
        experts = ex.prepack(experts, manifest, device.threads, device.providers)
    # every expert at its measured resident cost (a session's, where experts are sessions): what "100%" holds
    total_experts = sum(experts.cost[lay.key] * len(lay.experts) for lay in manifest.sparse_layers())
    monitor = MemoryMonitor(device.spec.process_cap(baseline, total_experts), reserve=device.reserve_bytes,
                            period_s=config.monitor_period_s, on_change=None, available_fn=available_fn, rss_fn=rss_fn)
    if experts.runners:  # lowbit_kernel="auto": copies as sessions, unless the first budget is short of them
        experts, baseline = _kernels_for_budget(experts, monitor.sample_once().budget, baseline, manifest, config,
                                                family, sessions, device, profile)
    try:
        fit = Fit(manifest, config, sparse, norms, profile, experts, residents, baseline, monitor.cap, monitor, family)
    except BudgetError as e:
        raise _in_share_terms(e, device.spec, baseline, total_experts) from None
    model = family.build(manifest, sessions, fit.policy, moe_hook)
    parts = Parts(manifest, config, family, device, sessions, tokenizer, experts, sparse, norms, profile, model,
                  no_repeat, residents, fit.policy, fit, dense_files, startup)

    # The start set resident, the policy's thread and the monitor running.
    t1 = time.perf_counter()
    if prefetch is not None:
        prefetch.join()
    fit.policy.warm(background=config.cold_start == "background")
    if isinstance(experts.store, ExpertStore):
        experts.store.drop_prefetched()  # what the start set did not take would be held uncounted
    startup["warm_s"] = time.perf_counter() - t1
    fit.policy.start()
    monitor.on_change = fit.on_budget  # residents exist now: budget moves may resize them
    monitor.on_steady = fit.on_steady  # and RSS over the budget holds fewer expert bytes
    monitor.start()
    return parts


def _kernels_for_budget(experts: Experts, budget: int, baseline: int, manifest: Manifest, config: RuntimeConfig,
                        family: Family, sessions: DenseSessions, device: Device, profile: Profile) -> tuple[Experts, int]:
    """Experts priced for the first budget's capacity (experts.kernels_for_capacity), and the
    baseline measured again (uncached) where a rung took the standard kernel's buffers on."""
    had = {name for name, r in experts.runners.items() if "standard" in r.modes.values()}
    experts, moved = ex.kernels_for_capacity(experts, budget - baseline, config.ladder_primary, manifest.expert_dtype,
                                             profile, manifest.config.num_experts)
    if moved:
        log.info("ladder: %s run on the standard-op kernel: the budget cannot hold every expert's lowest copy "
                 "as a session", ", ".join(f"{stack} {name}" for name, stack in moved))
    if {name for name, _ in moved} - had:
        baseline, _ = baseline_mod.baseline(manifest, replace(config, baseline_cache=False), family, sessions, experts,
                                            device.threads, device.providers)
    return experts, baseline


def load_model(artifact: str | Path, config: RuntimeConfig = RuntimeConfig(), *, store: ExpertStore | None = None,
               moe_hook: MoEHook | None = None) -> ModelParts:
    """The model of ``artifact`` and what runs it, without a budget: no baseline, no monitor, no
    thread. Its MoE is exact: each expert is read on first use and kept."""
    manifest, config, family, device, sparse, norms, profile, _ = _open(artifact, config, None)
    store = store or ExpertStore(manifest, verify=config.verify, read_mode=config.read_mode)
    sessions = DenseSessions(manifest, threads=device.threads, providers=device.providers,
                             provider_options=device.provider_options)
    experts = _expert_path(manifest, replace(config, policy="full"), device, sessions, store)
    moe = held_moe(family, experts, manifest.config.expert_capacity)
    return ModelParts(manifest, config, family, device, sessions, load_tokenizer(manifest), experts, sparse, norms,
                      profile, family.build(manifest, sessions, moe, moe_hook), generation_settings(manifest.generation))


def held_moe(family: Family, experts: Experts, capacity: int) -> MoEFn:
    """The family's exact MoE over experts read from the store on first use and kept (no budget)."""
    held = {}

    def run(key, x):
        expert = held.get(key)
        if expert is None:
            expert = held[key] = experts.store.read(key)
        return experts.kernel(expert, x)

    return family.exact_moe(run, capacity)
