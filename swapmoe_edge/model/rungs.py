"""Running the precision ladder's low-bit expert copies (export/ladder.py writes them).

Two ways, chosen once at load (``RungRunner.mode``):

- ``nbits``: each resident copy is its own ONNX Runtime session built from the rung's
  template graph, with the bytes the store read handed over in memory
  (``add_external_initializers_from_files_in_memory``). ORT copies them into
  ``com.microsoft.MatMulNBits``' prepacked form at session creation, and the read buffer
  is dropped. Measured here (one thread, docs/results/ladder.md): a 768x3072 int4 expert
  runs a token in 0.29 ms against 1.18 ms for float32 weights fed to the shared kernel
  and 37.5 ms for int4 on standard ops; MatMulNBits with the int4 weights fed as inputs
  (no prepacking) took 8.8 ms in a separate test.
- ``standard``: the copy's arrays are fed to the rung's standard-op kernel (dequantise,
  then MatMul, on every call): slower, but any execution provider runs it.

A resident copy's budget cost is measured (RSS added per session, never below its block
size), not assumed: ORT's packed form and per-session state differ from the file's bytes.

``auto`` decides per stack. Decoder experts run once per generated token: they get ``nbits``
where it runs, unless the first budget is short of sessions (``sessions_short``). Encoder experts run once per request, so memory counts more than
speed there: when a session costs more than ``SESSION_OVERHEAD_LIMIT`` times the copy's
bytes and the copy is small (``STANDARD_MAX_BYTES``; small experts: ORT keeps ~25-50 KiB of state per session, so an 80 KiB int4 copy of
the embedded model's experts costs ~120 KiB as a session), encoder copies run ``standard``.
On the embedded model at 33% of its float16 expert bytes that held 56 experts instead of
44 and lifted validation ROUGE-2 from 0.2545 to 0.2646 (docs/results/ladder.md).

Coverage before speed: where the first budget's expert capacity cannot hold every expert's
lowest copy at the measured session cost, a rung whose template runs at accuracy level 4
opens its sessions from its level-0 template instead where that holds fewer bytes
(``levels_short``: a level-4 session packs a 768x3072 int4 copy into 1.42x its bytes, a
level-0 one into about its bytes; level 0 is slower on many-token prefill), and the stacks
whose small copies cost more than ``SESSION_OVERHEAD_LIMIT`` times their bytes as sessions
run ``standard`` too (decoder included), so that the budget holds more of them
(``sessions_short``). Both are chosen once, at load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import onnxruntime as ort

from swapmoe_edge.core.units import format_size
from swapmoe_edge.core.errors import ArtifactError, InputError
from swapmoe_edge.artifact.manifest import LadderRung, Manifest
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.model.sessions import session_options
from swapmoe_edge.artifact.store import ExpertReadError, LoadedExpert
from swapmoe_edge.model.prepacked import NBITS_PROVIDERS, session_bytes


PRIMARY = ""  # the rung name of the artifact's own experts
# Planner quality of a rung when the profile has no measured rung loss: 1 - the relative RMS
# error of its weights on Gaussian weights (int4: 9.7%, int8: 0.5%; export/ladder.py).
# Measured end to end, int4 experts change the embedded model's ROUGE-2 by less than its
# run-to-run noise (docs/results/README.md), so the planner prefers any copy of an expert to
# none by a wide margin. A measured profile replaces these per layer (measured_quality).
# int2 (relative RMS error 33% with the searched scales) measured 0.83-0.95 per layer on the
# embedded model (docs/results/ladder.md), below int4's 0.990-0.996: 0.9 until measured.
QUALITY = {"int2": 0.9, "int4": 0.97, "int8": 0.995, PRIMARY: 1.0}


@dataclass(frozen=True)
class Rung:
    name: str  # PRIMARY for the artifact's own precision
    cost: int  # measured resident bytes of one expert on this rung
    quality: float

log = logging.getLogger(__name__)
MODES = ("auto", "nbits", "standard")
SESSION_OVERHEAD_LIMIT = 1.25
# ... and only for copies this small: the standard-op kernel dequantises the whole copy on every
# call, ~0.2 ms for the embedded model's 128x512 copies but ~40 ms for a 768x3072 one, whose
# session (accuracy level 4: int8 compute) costs 1.42x its bytes for its packed form, not for
# fixed state (docs/results/ladder.md).
STANDARD_MAX_BYTES = 1 << 20


class RungRunner:
    """Turns read rung blocks into runnable experts, and runs the ``standard`` ones."""

    def __init__(self, manifest: Manifest, rung: str, sessions, threads: int | None, providers: list[str] | None,
                 mode: str = "auto"):
        if rung not in manifest.ladder:
            have = ", ".join(manifest.ladder) or "none"
            raise ArtifactError(f"{manifest.root} has no {rung} rung on its precision ladder (it has: {have}). Export it "
                                "again (swapmoe export ... --ladder int4) or add one: swapmoe ladder add ARTIFACT --rung int4.")
        if mode not in MODES:
            raise InputError(f"lowbit_kernel must be one of {', '.join(MODES)}, not {mode!r}")
        self.manifest, self.rung = manifest, rung
        self.info: LadderRung = manifest.ladder[rung]
        self.sessions = sessions  # DenseSessions: the standard-op kernel lives there
        self.threads, self.providers = threads, providers or ["CPUExecutionProvider"]
        self.template = manifest.path(self.info.session_graph).read_bytes()  # read once, not on every swap
        alt = self.info.session_graph_level0  # the template at accuracy level 0, where the default is higher
        self.level0 = manifest.path(alt).read_bytes() if alt else None
        self.level0_costs: dict[str, int] = {}  # stack -> one copy's measured bytes as a level-0 session
        self.on_level0 = False
        self.requested = mode
        self.mode = self._choose(mode)  # the decoder's (and, unless measure_cost says otherwise, the encoder's)
        self.modes = {"encoder": self.mode, "decoder": self.mode}
        self.costs: dict[str, int] = {}  # stack -> measured resident bytes of one copy
        self.nbytes = 0  # one copy's bytes as stored (measure_cost)

    def _choose(self, mode: str) -> str:
        if mode == "standard":
            return "standard"
        why = None
        if self.providers[0] not in NBITS_PROVIDERS:
            why = f"the first provider {self.providers[0]} has no MatMulNBits kernel"
        else:
            try:  # a template this ORT build cannot run falls back instead of failing every swap
                key = next(iter(self.manifest.experts))
                e = self.manifest.experts[key].rungs[self.rung]
                self._session(np.zeros(e.nbytes, np.uint8))
            except Exception as ex:  # ORT raises several untyped errors
                why = f"ONNX Runtime cannot run its template ({ex})"
        if why is None:
            return "nbits"
        if mode == "nbits":
            raise InputError(f"lowbit_kernel=nbits cannot be used: {why}. Use lowbit_kernel=auto or standard.")
        log.warning("the %s rung runs on standard ONNX ops (slower): %s", self.rung, why)
        return "standard"

    def _session(self, block: np.ndarray, template: bytes | None = None) -> ort.InferenceSession:
        """A session of ``template`` (None: the rung's current one) on the copy's bytes ``block``."""
        opts = session_options(self.threads)
        # Two MatMulNBits and an activation: graph rewrites have nothing to fuse, and skipping
        # them shortens every session build (one per copy swapped in).
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_external_initializers_from_files_in_memory([self.info.data_name], [block], [block.nbytes])
        return ort.InferenceSession(template or self.template, sess_options=opts, providers=self.providers)

    def load(self, expert: LoadedExpert, mode: str | None = None) -> LoadedExpert:
        """A read rung block -> an expert the kernel runs (a session of its own in ``nbits`` mode)."""
        assert expert.rung == self.rung, (expert.rung, self.rung)
        stack = expert.key.stack
        cost = self.costs.get(stack) or expert.nbytes
        if (mode or self.modes[stack]) == "standard":
            return replace(expert, nbytes=cost)
        assert expert.block is not None, "the store keeps a rung's block"
        sess = self._session(expert.block)  # ORT copies the bytes; the block goes with ``expert``
        return replace(expert, feeds={}, block=None, session=sess, nbytes=cost)

    def run(self, expert: LoadedExpert, x: np.ndarray) -> np.ndarray:
        if expert.session is not None:
            return expert.session.run(None, {"x": x})[0]
        return self.sessions.run(self.info.kernel, {"x": x, **expert.feeds})[0]

    def measure_cost(self, read) -> dict[str, int]:
        """Resident bytes one copy adds, per stack (heap in use per session, else RSS, averaged
        over enough copies to rise above the noise; at least the block size); settles ``modes``.
        ``read(key)`` reads one rung block."""
        raw = None
        for key in self.manifest.experts:  # an unreadable copy is the policy's to report, not the start's
            try:
                raw = read(key)
                break
            except ExpertReadError as e:
                log.warning("%s; measuring the %s rung's cost on another expert", e, self.rung)
        if raw is None:
            raise ArtifactError(f"{self.manifest.root}: no expert's {self.rung} copy can be read; export the model again.")
        nbytes = self.nbytes = raw.nbytes
        session = nbytes
        if self.mode == "nbits":
            # heap in use: in a test process full of freed memory, RSS put the embedded model's copies at 1.1x their bytes
            session = session_bytes(lambda: self.load(raw, "nbits"), nbytes)
        if self.requested == "auto" and session > SESSION_OVERHEAD_LIMIT * nbytes and nbytes <= STANDARD_MAX_BYTES:
            self.modes["encoder"] = "standard"
        self.costs = {stack: session if mode == "nbits" else nbytes for stack, mode in self.modes.items()}
        if self.mode == "nbits" and self.level0 is not None and self.requested == "auto":
            level0 = session_bytes(lambda: self._session(raw.block, self.level0), nbytes)
            self.level0_costs = {stack: level0 if mode == "nbits" else nbytes for stack, mode in self.modes.items()}
        return dict(self.costs)

    def cheaper_at_level0(self) -> bool:
        """Whether this rung's sessions hold fewer bytes at accuracy level 0 (as measured)."""
        return not self.on_level0 and bool(self.level0_costs) and \
            sum(self.level0_costs.values()) < sum(self.costs.values())

    def use_level0(self) -> None:
        """Open this rung's sessions from the level-0 template (before any is loaded): float32
        arithmetic on the dequantised weights, no packed int8 form beside them."""
        self.template, self.costs, self.on_level0 = self.level0, dict(self.level0_costs), True

    def dearer_as_sessions(self) -> list[str]:
        """Stacks that ``auto`` runs as sessions though a small copy costs more than
        ``SESSION_OVERHEAD_LIMIT`` times its bytes that way."""
        if self.requested != "auto" or not self.nbytes or self.nbytes > STANDARD_MAX_BYTES:
            return []
        return [s for s, mode in self.modes.items()
                if mode == "nbits" and self.costs.get(s, 0) > SESSION_OVERHEAD_LIMIT * self.nbytes]

    def use_standard(self, stack: str) -> None:
        """Run this stack's copies on the standard-op kernel (before any is loaded)."""
        self.modes[stack] = "standard"
        self.costs[stack] = self.nbytes


def _how_to_add(manifest: Manifest) -> str:
    """How to give this artifact a ladder: rungs sit below the experts' type and are made from float experts."""
    dtype = manifest.expert_dtype
    if dtype in ("float32", "float16"):
        return "Export the model again (its int4 rung is the default) or add one: swapmoe ladder add ARTIFACT --rung int4."
    below = "--ladder int2" if dtype == "int4" else "--ladder int4"
    return (f"Its experts are {dtype}, and rungs are made from float experts, so `swapmoe ladder add` cannot: export "
            f"the model again with {below}, or with --expert-dtype float16 for the default int4 ladder; or serve "
            f"this artifact with swapmoe or prune, which run the {dtype} experts as they are.")


def rung_runners(manifest: Manifest, config, sessions, threads: int | None, providers: list[str],
                 placement: str) -> dict[str, RungRunner]:
    """A runner per rung the config asks for (``ladder_rungs``: "auto" is all the artifact has)."""
    have = list(manifest.ladder)
    want = have if config.ladder_rungs == "auto" else [r.strip() for r in config.ladder_rungs.split(",")]
    if not want:
        raise InputError(f"{manifest.root} has no precision ladder: the ladder policy needs one. {_how_to_add(manifest)}")
    if placement != "host":
        raise InputError("the ladder policy holds experts on the host for now; use expert_placement=host")
    return {r: RungRunner(manifest, r, sessions, threads, providers, config.lowbit_kernel) for r in want}


def measure_ladders(runners: dict[str, RungRunner], store, expert_cost: dict[LayerKey, int], primary: bool,
                    primary_name: str, warn: bool = True) -> dict[LayerKey, list[Rung]]:
    """Each sparse layer's ladder, lowest first, with the measured cost of one copy per rung (a
    copy may cost more in one stack than the other); ``primary``: the artifact's own experts on top."""
    costs = {name: runner.measure_cost(lambda k, name=name: store.read(k, rung=name)) for name, runner in runners.items()}
    return ladders_from_costs(costs, expert_cost, primary, primary_name, warn)


def ladders_from_costs(costs: dict[str, dict[str, int]], expert_cost: dict[LayerKey, int], primary: bool,
                       primary_name: str, warn: bool = True) -> dict[LayerKey, list[Rung]]:
    """Each sparse layer's ladder from each rung's cost of one copy per stack (a rung that costs
    more than a better one is left out, with a warning where ``warn``)."""
    ladders = {}
    for lk, own in expert_cost.items():
        rungs = [Rung(name, c[lk.stack], QUALITY[name]) for name, c in costs.items()]
        if primary:
            rungs.append(Rung(PRIMARY, own, QUALITY[PRIMARY]))
        rungs.sort(key=lambda r: (r.cost, -r.quality))
        kept: list[Rung] = []
        for r in rungs:  # a rung that costs more than a better one is never worth holding
            if kept and r.quality <= kept[-1].quality:
                (log.warning if warn else log.debug)(
                    "ladder: in %s the %s rung costs %s an expert as measured, more than the better %s rung (%s); "
                    "not used", lk.name, r.name or primary_name, format_size(r.cost),
                    kept[-1].name or primary_name, format_size(kept[-1].cost))
                continue
            kept.append(r)
        ladders[lk] = kept
    return ladders


def levels_short(runners: dict[str, RungRunner], ladders: dict[LayerKey, list[Rung]], capacity: int,
                 num_experts: int) -> list[str]:
    """Rungs that should open their sessions at accuracy level 0 for ``capacity`` bytes of
    experts: none where every expert's lowest copy fits as measured; else each whose level-0
    sessions hold fewer bytes (``auto`` only: ``measure_cost`` measures level 0 then)."""
    if sum(num_experts * ladder[0].cost for ladder in ladders.values()) <= capacity:
        return []
    return [name for name, r in runners.items() if r.cheaper_at_level0()]


def sessions_short(runners: dict[str, RungRunner], ladders: dict[LayerKey, list[Rung]], capacity: int,
                   num_experts: int) -> list[tuple[str, str]]:
    """(rung, stack) pairs that should run the standard kernel for ``capacity`` bytes of experts:
    none where every expert's lowest copy fits as measured; else each stack whose small copies
    cost more than ``SESSION_OVERHEAD_LIMIT`` times their bytes as sessions (``auto`` only)."""
    if sum(num_experts * ladder[0].cost for ladder in ladders.values()) <= capacity:
        return []
    return [(name, stack) for name, r in runners.items() for stack in r.dearer_as_sessions()]
