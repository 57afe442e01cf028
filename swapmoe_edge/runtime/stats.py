"""What one request reports: clocks the caller stamps, and counters read around it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.residency.resident import ResidentSet
from swapmoe_edge.system import memory


@dataclass
class Result:
    summary: str | None
    token_ids: list[int]
    exact: bool
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Meter:
    """Around one request: the policy's and the store's counters before it, its start time, and a
    time stamp per token (``token``), which the caller takes as each step comes out. ``since``:
    the counters to count from (the last request's ``after``), instead of now."""

    def __init__(self, policy, store, since: tuple[dict, dict] | None = None):
        self.policy, self.store = policy, store
        self.before = since or (policy.counters.snapshot(), store.counters())
        self.after: tuple[dict, dict] | None = None
        memory.reset_peak_rss()
        self.times: list[float] = []
        self.t0 = time.perf_counter()
        self.boundary_wait_s = 0.0

    def started(self, waited_s: float) -> None:
        """The request may run now, after waiting ``waited_s`` for the residency engine's request
        boundary (deterministic); its clocks start here."""
        self.boundary_wait_s = waited_s
        self.t0 = time.perf_counter()

    def token(self) -> None:
        self.times.append(time.perf_counter())

    def timings(self) -> dict[str, Any]:
        t0, times = self.t0, self.times
        ttft = (times[0] - t0) if times else 0.0
        decode = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        return {"ttft_ms": ttft * 1e3, "decode_ms_per_token": decode * 1e3,
                "request_ms": ((times[-1] if times else time.perf_counter()) - t0) * 1e3, "steps": len(times),
                "boundary_wait_ms": self.boundary_wait_s * 1e3}

    def counted(self) -> tuple[dict[str, float], dict[str, float], dict[str, float], dict[str, float]]:
        """(policy counters before, after; store counters before, after)."""
        pol0, io0 = self.before
        self.after = (self.policy.counters.snapshot(), self.store.counters())
        return pol0, self.after[0], io0, self.after[1]


def request_stats(parts, meter: Meter, request: int) -> dict[str, Any]:
    """The stats of one request (chunk) that ``meter`` measured, from the runtime's ``parts``."""
    config, manifest, residents, fit = parts.config, parts.manifest, parts.residents, parts.fit
    pol0, pol1, io0, io1 = meter.counted()
    routed = pol1["routed"] - pol0["routed"]
    first_choice = (pol1["first_choice_resident"] - pol0["first_choice_resident"]) / routed if routed else 1.0
    # An approximate policy gave full's tokens if every token, padding included, found its
    # first choice resident (routing and capacity as full's) and the gate was not
    # renormalised; rounded or quantised experts never do.
    lowbit = pol1["lowbit_tokens"] - pol0["lowbit_tokens"]
    as_full = pol1["rerouted"] == pol0["rerouted"] and not config.renormalize and lowbit == 0
    exact = (parts.policy.exact or as_full) and not manifest.expert_dtype_lossy
    return {
        "policy": config.policy,
        "device": parts.device.profile.name,
        "providers": list(parts.device.providers),
        "expert_placement": parts.experts.placement,
        "prepacked_experts": parts.experts.prepacked,
        **meter.timings(),
        "request": request,  # one number per chunk that ran: rows sharing it shared these stats
        "peak_rss_bytes": memory.peak_rss(),
        "budget_bytes": int(fit.budget_bytes) if fit.budget_bytes is not None else None,
        "budget_source": fit.budget_source,
        # RSS found over the budget while serving (memory the baseline does not account for),
        # held off the experts since
        "unaccounted_bytes": int(fit.unaccounted),
        "baseline_bytes": fit.baseline,
        "resident_expert_bytes": residents.nbytes,
        "residents": residents.counts(),
        "bytes_read": int(io1["bytes_read"] - io0["bytes_read"]),
        "loads": int(pol1["loads"] - pol0["loads"]),
        "swaps": int(pol1["swaps"] - pol0["swaps"]),
        "stall_ms": (pol1["stall_s"] - pol0["stall_s"]) * 1e3,
        "first_choice_resident": first_choice,
        "low_precision_tokens": int(lowbit),  # ran a low-bit copy of their expert (ladder; lossy)
        "residents_by_rung": residents_by_rung(residents, parts.sparse, manifest.expert_dtype),
        "unavailable_experts": sorted(k.name for k in residents.unavailable),
        # experts held only at the precisions that can still be read (the ladder): {expert: unreadable rungs}
        "degraded_experts": {k.name: sorted(r or manifest.expert_dtype for r in bad)
                             for k, bad in sorted(residents.degraded.items(), key=lambda kv: kv[0].name)},
        # the files behind both, for the user to restore (a read failed its sha256 or I/O)
        "unavailable_files": sorted({str(e.path) for e in parts.policy.failed.values()}),
        "exact": exact,
        # The same inputs give this output again under any load (RuntimeConfig.deterministic, or a
        # policy without a swapper); if not, why not.
        "deterministic": not parts.policy.nondeterminism,
        "nondeterminism": parts.policy.nondeterminism,
        "expert_dtype": manifest.expert_dtype,
    }


def residents_by_rung(residents: ResidentSet, layers: Iterable[LayerKey], own_dtype: str) -> dict[str, int]:
    """Resident experts per precision (a rung's name, or the artifact's own expert dtype)."""
    out: dict[str, int] = {}
    for lk in layers:
        for ex in residents.layer(lk).values():
            name = ex.rung or own_dtype
            out[name] = out.get(name, 0) + 1
    return out
