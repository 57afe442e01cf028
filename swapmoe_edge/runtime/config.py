"""What a Runtime is asked to do: policy, budget, devices, and the knobs of each policy.

A frozen dataclass (STYLE: everything handed between parts is), validated at construction
so that a bad value fails before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from swapmoe_edge.core.errors import InputError
from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.model.moe import ABSENT
from swapmoe_edge.residency.policies import POLICIES
from swapmoe_edge.residency.policies.on_demand import EVICT
from swapmoe_edge.artifact.store import READ_MODES

PREDICT_MODES = ("auto", "wait", "background", "off")


@dataclass(frozen=True)
class RuntimeConfig:
    policy: str = "swapmoe"
    budget: str = "auto"  # "4.7GiB" (whole process), "33%" (of expert bytes), or "auto"
    planner: str = "importance"  # per-layer split of the expert budget: importance | uniform
    reserve_bytes: int | None = None  # kept free for the rest of the system; None: the device profile's
    monitor_period_s: float = 0.25
    activation_margin: float = 0.05  # of the measured baseline, for larger inputs than the warm-up
    # Longest input row, and the activation envelope: the baseline's warm-up runs one row
    # of this many tokens, and generate() runs larger batches in chunks of at most this
    # many rows x beams x tokens, so no request's activations outgrow what was measured.
    # None: the artifact's (the tokenizer's model_max_length at export), else 512.
    max_source_tokens: int | None = None
    threads: int | None = None  # None: the device profile's (its None: all cores)
    device: str | None = None  # device profile name or .json path; None: detect this machine
    verify: str = "first"
    # How experts are read from flash (store.py): "fadvise" drops their pages from the page
    # cache after the read, "direct" bypasses it (O_DIRECT), "cached" leaves them there.
    read_mode: str = "direct"
    # "blocking": the start set is resident before the constructor returns (reproducible
    # runs); "background": lossy policies (and on-demand, whose misses read anyway) start
    # with one expert per layer and fill the rest on a thread, so a device serves its first
    # request once the dense part is in. `full` always blocks.
    cold_start: str = "blocking"
    # Reuse the baseline measured by an earlier process with the same artifact and settings
    # (baseline_cache.py) instead of running the warm-up pass: a faster launch on a device.
    baseline_cache: bool = False
    # Resident experts: "host" numpy arrays, or "device" OrtValues on the kernel provider's
    # device (placement.py); "auto": device when the first provider is CUDA.
    expert_placement: str = "auto"
    renormalize: bool = False  # swapmoe/prune: gate renormalised over residents
    # A top-k family's choice that is not resident (every lossy policy; moe.route_topk):
    # "substitute" routes it to the best resident expert not already among the token's choices
    # (SwapMoE's masked routing, generalised); "drop" drops it and renormalises the gates of the
    # rest. Top-1 (Switch): "drop" skips a token whose expert is not resident.
    absent: str = "substitute"
    # Resident experts as their own sessions with prepacked weights (prepacked.py): ~30% faster
    # expert matmuls for one token (~6% of a switch-base token), but the start takes 1.1-2.3x
    # as long (each expert opened and packed) and each may cost up to ~0.6 MiB more. "auto" uses
    # them for `full` (loads every expert once, never swaps) with float32 experts on the host;
    # "on" wherever possible; "off" (default: sweeps start a `full` cell per process) never.
    prepack_experts: str = "off"
    # Swap rate: at most this many experts per interval (switch-base: 19 MB each, read and
    # hashed on the swapper thread, which shares the cores with the token loop).
    swap_interval_s: float = 0.1
    max_swaps_per_interval: int = 1
    hysteresis: float = 0.1
    # Swaps take effect only at request boundaries: the swapper plans and carries out one round
    # (at most max_swaps_per_interval swaps, or a decoder prediction's burst) after each request,
    # and the next request waits for it (stats: boundary_wait_ms), so the same artifact, budget,
    # inputs and batches give the same outputs under any load. A background start fill is waited
    # for by the first request. A memory-pressure shrink is still honoured at once; the stats
    # then say the output is not deterministic, and why (``nondeterminism``). None: the policy's
    # default (on for swapmoe, where it measured free; off for the ladder, whose boundary rounds
    # cost time: docs/results/deterministic), and off with cold_start="background" (serve while
    # the start set is still being read) or predict_decoder="background" (swap while decoding).
    deterministic: bool | None = None
    # swapmoe's importance between requests: online sums decay by ``decay`` after each request,
    # and the calibrated profile counts as ``prior_documents`` documents that never decay
    # (importance.set_prior; None: the profile only seeds the sums and decays with them).
    # Chosen by trace replay on the validation split (docs/results/streams/README.md): the old
    # 0.5 without a prior chased the last two documents and lost to the static set on shuffled
    # streams; a prior too strong never moves on a stream calibrated on other sections.
    decay: float = 0.8
    prior_documents: float | None = 4.0
    # swapmoe: plan the decoder layers of each request from its encoder routing when the profile
    # has a decoder predictor (`swapmoe profile --predict-decoder`; predictor.py). "wait": the
    # token loop makes the predicted swaps before the request's first decoder step (reads on the
    # token loop, counted as stall); "background": the swapper makes them at once, while the
    # first tokens decode with the old sets (measured worse than "off": docs/results/streams);
    # "off"; "auto": "wait" for experts of at most PREDICT_WAIT_MAX_EXPERT_BYTES (the embedded
    # model's 0.5 MiB: ~7 ms a request), else "off" (a switch-base expert is 19 MB: each
    # predicted swap would hold the first token for a read of that size).
    predict_decoder: str = "auto"
    # Planner weight of a decoder layer's importance share against an encoder layer's (1).
    # A decoder miss changes the next token, and greedy decoding carries the change through
    # the rest of the summary; an encoder miss perturbs one of the many source states that
    # cross-attention averages. With weight 1 the embedded model's importance planner gave
    # its concentrated decoder layers 5 experts of 16 and the encoder 10-11, and at 50% of
    # the experts swapmoe matched full on 29% of validation documents, prune on 46%; with
    # 8, swapmoe matched 71% (scripts/tune_swapmoe.py; 2-64 measured, docs/results/README.md). When the
    # profile carries measured loss curves (`swapmoe profile --measure-loss`), swapmoe's split
    # uses them instead and this weight only orders its swaps (planner.plan_by_loss).
    decoder_weight: float = 8.0
    # The `ladder` policy (residency/policies/ladder.py): which of the artifact's low-bit rungs to use
    # ("auto": all it has; or e.g. "int4"), whether the artifact's own precision is the top
    # rung (False: experts are only ever held as low-bit copies), and how copies run
    # (rungs.py: "nbits" ORT's MatMulNBits, "standard" dequantising ops, "auto" nbits where it runs);
    # ``lowbit_kernel`` also says how an artifact's own int4 experts run (prepacked.NbitsStore).
    ladder_rungs: str = "auto"
    ladder_primary: bool = True
    lowbit_kernel: str = "auto"
    # ladder: a token whose first choice has no resident copy waits while its lowest copy is
    # read (routing as the full model's, with on-demand's stalls) instead of being rerouted
    ladder_wait: bool = False
    # ladder: split the copies between layers by the profile's measured loss curves, when it has them
    ladder_loss_split: bool = True
    # on-demand: which resident a miss evicts: the one its layer's tokens chose least so far
    # ("frequency"), or the least recently used ("recency", the classic baseline). Exact either
    # way; frequency read 36-47% fewer bytes in replays of the test streams (policies/on_demand.py).
    on_demand_evict: str = "frequency"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise InputError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.predict_decoder not in PREDICT_MODES:
            raise InputError(f"predict_decoder must be one of {', '.join(PREDICT_MODES)}, not {self.predict_decoder!r}")
        if self.prepack_experts not in ("auto", "on", "off"):
            raise InputError(f"prepack_experts must be auto, on or off, not {self.prepack_experts!r}")
        if self.cold_start not in ("blocking", "background"):
            raise InputError(f"cold_start must be 'blocking' or 'background', not {self.cold_start!r}")
        if self.absent not in ABSENT:
            raise InputError(f"absent must be one of {', '.join(ABSENT)}, not {self.absent!r}")
        if self.read_mode not in READ_MODES:
            raise InputError(f"read_mode must be one of {', '.join(READ_MODES)}, not {self.read_mode!r}")
        if self.on_demand_evict not in EVICT:
            raise InputError(f"on_demand_evict must be one of {', '.join(EVICT)}, not {self.on_demand_evict!r}")
        if not (self.decoder_weight > 0 and math.isfinite(self.decoder_weight)):
            raise InputError(f"decoder_weight must be a positive number, got {self.decoder_weight!r}")

    def layer_weights(self, layers) -> dict[LayerKey, float]:
        """The planner's weight of each sparse layer: ``decoder_weight`` for decoder layers, else 1."""
        return {lk: self.decoder_weight if lk.stack == "decoder" else 1.0 for lk in layers}
