"""How experts are read and run: a store, a kernel and what one costs resident.

``load`` starts from the artifact's shared expert kernel and applies the variants the config
asks for as transforms, each taking ``Experts`` and returning new ones: experts placed on the
device (placement.py), low-bit copies for the ladder (rungs.py), prepacked sessions
(prepacked.py). A transform wraps the store and the kernel together, so that the kernel knows
the experts its store returns, and the token loop takes no branch for a variant it does not use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from swapmoe_edge.artifact.manifest import Manifest
from swapmoe_edge.artifact.store import LoadedExpert
from swapmoe_edge.core.errors import InputError
from swapmoe_edge.core.units import format_size
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.model.placement import DeviceKernel, PlacingStore
from swapmoe_edge.model.prepacked import NBITS_PROVIDERS, NbitsStore, PrepackedStore
from swapmoe_edge.model.rungs import (SESSION_OVERHEAD_LIMIT, STANDARD_MAX_BYTES, Rung, RungRunner, ladders_from_costs,
                                      levels_short, measure_ladders, sessions_short)
from swapmoe_edge.model.sessions import DenseSessions
from swapmoe_edge.residency.planner import measured_quality
from swapmoe_edge.residency.policies import policy_class

log = logging.getLogger(__name__)
KernelFn = Callable[[LoadedExpert, np.ndarray], np.ndarray]  # (expert, x [N, D]) -> y [N, D]


@dataclass(frozen=True)
class Experts:
    store: Any  # an ExpertStore, or a transform's wrapper of one (same read/counters)
    kernel: KernelFn
    cost: dict[LayerKey, int]  # resident bytes of one expert, per sparse layer
    placement: str = "host"  # where resident experts live: host | device
    device_kernel: DeviceKernel | None = None
    runners: dict[str, RungRunner] = field(default_factory=dict)  # rung name -> runner (ladder)
    rungs: dict[LayerKey, list[Rung]] = field(default_factory=dict)  # each layer's ladder, lowest first
    prepacked: bool = False


def shared_kernel(manifest: Manifest, store, sessions: DenseSessions) -> Experts:
    """The artifact's experts as they are: each one's weights fed to the one expert-kernel session."""
    session = sessions.get("expert_kernel")
    cost = {lay.key: manifest.experts[lay.experts[0]].nbytes for lay in manifest.sparse_layers()}
    return Experts(store, lambda e, x: session.run(None, {"x": x, **e.feeds})[0], cost)


def int4_sessions(experts: Experts, manifest: Manifest, lowbit_kernel: str, threads: int | None,
                  providers: list[str]) -> Experts:
    """int4 experts as MatMulNBits sessions of their own (NbitsStore), at their measured cost; the
    shared standard-op kernel where ``lowbit_kernel`` is "standard", the experts sit on the device
    or the first provider has no MatMulNBits (InputError where ``lowbit_kernel`` is "nbits"), and,
    under "auto", for small experts that cost more than ``SESSION_OVERHEAD_LIMIT`` times their
    bytes as sessions (as the ladder's small copies: ORT keeps ~25-50 KiB of state a session, and
    dequantising a small expert on each call is cheap), unless the experts are at accuracy level 4:
    the standard-op kernel computes level 0's float32 arithmetic, so it would not run the
    artifact's validated model (a warning says so where it must)."""
    if manifest.expert_dtype != "int4":
        return experts
    level4 = (manifest.expert_nbits or {}).get("accuracy_level") == 4
    why = ("lowbit_kernel is standard" if lowbit_kernel == "standard"
           else f"the first provider {providers[0]} has no MatMulNBits kernel" if providers[0] not in NBITS_PROVIDERS
           else "experts are placed on the device" if experts.placement != "host" else None)
    if why:
        if lowbit_kernel == "nbits":
            raise InputError(f"lowbit_kernel=nbits cannot be used: {why}. Use lowbit_kernel=auto or standard.")
        if level4 or lowbit_kernel != "standard":
            log.warning("the int4 experts run on standard ONNX ops (slower%s): %s",
                        "; without the level-4 rounding of their activations that export validated" if level4 else "", why)
        return experts
    store = NbitsStore(experts.store, threads, providers)
    cost = store.measure_cost()
    nbytes = next(iter(manifest.experts.values())).nbytes
    if lowbit_kernel == "auto" and not level4 and nbytes <= STANDARD_MAX_BYTES and cost > SESSION_OVERHEAD_LIMIT * nbytes:
        log.info("int4 experts run on standard ONNX ops: as sessions they would cost %s each, %.2fx their bytes",
                 format_size(cost), cost / nbytes)
        return experts
    return replace(experts, store=store, kernel=_sessions_first(experts.kernel), cost={lk: cost for lk in experts.cost})


def _sessions_first(inner: KernelFn) -> KernelFn:
    """Experts with a session of their own run it; the others go to ``inner``."""

    def kernel(e: LoadedExpert, x: np.ndarray) -> np.ndarray:
        return e.session.run(None, {"x": x})[0] if e.session is not None else inner(e, x)

    return kernel


def place(experts: Experts, placement: str, ort_device: str, sessions: DenseSessions) -> Experts:
    """``device``: experts copied once into OrtValues on the kernel provider's device as they are read."""
    if placement != "device":
        return replace(experts, placement=placement)
    kernel = DeviceKernel(sessions.get("expert_kernel"), ort_device)
    return replace(experts, store=PlacingStore(experts.store, kernel), kernel=kernel.run, placement="device",
                   device_kernel=kernel)


def with_rungs(experts: Experts, runners: dict[str, RungRunner]) -> Experts:
    """Low-bit copies (``LoadedExpert.rung``) run on their rung's runner; the others as before."""
    inner = experts.kernel

    def kernel(e: LoadedExpert, x: np.ndarray) -> np.ndarray:
        return runners[e.rung].run(e, x) if e.rung is not None else inner(e, x)

    return replace(experts, kernel=kernel, runners=dict(runners))


def measure_rungs(experts: Experts, primary: bool, primary_name: str) -> Experts:
    """Each layer's ladder with the measured cost of one copy per rung (reads one copy of each),
    before the budget is known: kernels_for_capacity settles the kernels and prices the rungs."""
    # quiet: the costs may change once the first budget is known (kernels_for_capacity warns then)
    rungs = measure_ladders(experts.runners, experts.store, experts.cost, primary, primary_name, warn=False)
    return replace(experts, rungs=rungs)


def kernels_for_capacity(experts: Experts, capacity: int, primary: bool, primary_name: str, profile,
                         num_experts: int) -> tuple[Experts, list[tuple[str, str]]]:
    """``lowbit_kernel="auto"`` with the first budget known: where ``capacity`` cannot hold every
    expert's lowest copy as a session, small copies dearer as sessions run the standard kernel
    (rungs.sessions_short); then the ladders are priced (saying which rung a layer leaves out,
    and why), with rung qualities from the profile where it measured them (``profile
    --measure-loss``). Returns the experts and what moved."""
    if not experts.runners:
        return experts, []
    ladders = experts.rungs
    leveled = levels_short(experts.runners, ladders, capacity, num_experts)
    if leveled:
        for name in leveled:
            experts.runners[name].use_level0()
        log.info("ladder: %s copies open at MatMulNBits accuracy level 0: the budget cannot hold every expert's "
                 "lowest copy as a level-4 session", ", ".join(leveled))
        ladders = ladders_from_costs({n: dict(r.costs) for n, r in experts.runners.items()}, experts.cost, primary,
                                     primary_name, warn=False)
    moved = sessions_short(experts.runners, ladders, capacity, num_experts)
    for name, stack in moved:
        experts.runners[name].use_standard(stack)
    costs = {name: dict(r.costs) for name, r in experts.runners.items()}
    rungs = ladders_from_costs(costs, experts.cost, primary, primary_name)
    if rungs and profile.rung_loss:
        rungs = measured_quality(rungs, profile.importance, profile.loss, profile.rung_loss)
    return replace(experts, rungs=rungs), moved


def prepacking(experts: Experts, want: str, policy: str, manifest: Manifest) -> bool:
    """Whether ``prepack_experts=want`` applies here (InputError where "on" cannot)."""
    if want == "off" or (want == "auto" and not policy_class(policy).holds_all):
        return False
    why = None
    if experts.placement != "host":
        why = "experts are placed on the device"
    elif manifest.expert_dtype == "int4":
        why = "int4 experts are sessions of their own already"
    elif manifest.expert_dtype != "float32":
        why = f"experts are {manifest.expert_dtype} (ORT would fold them to float32 constants)"
    if why:
        if want == "on":
            raise InputError(f"prepack_experts=on cannot be used: {why}. Use prepack_experts=auto or off.")
        return False
    return True


def prepack(experts: Experts, manifest: Manifest, threads: int | None, providers: list[str]) -> Experts:
    """Experts read into sessions of their own with prepacked weights; each costs what one measured
    session added to RSS (reads and opens one expert now)."""
    store = PrepackedStore(experts.store, threads, providers)
    cost = store.measure_cost(next(iter(manifest.experts)))
    return replace(experts, store=store, kernel=_sessions_first(experts.kernel), cost={lk: cost for lk in experts.cost}, prepacked=True)

