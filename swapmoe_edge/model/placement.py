"""Where resident experts live, and how the expert kernel reaches them.

``host``: numpy arrays viewing the block read from flash; the kernel session gets them as
ordinary feeds (ONNX Runtime copies them to the device if its provider is a GPU, on every
call). ``device``: the swap-in copies each weight once into an ``OrtValue`` on the kernel
provider's device, and the kernel runs through an ``IOBinding`` that binds those values,
so the token loop never moves expert weights. With the CPU provider an ``OrtValue`` on
``cpu`` wraps the numpy array without a copy: the same code path runs on a CPU-only
machine, which is how the tests exercise it. With CUDA the experts then count in GPU
memory, not host RSS.

Only the expert weights are placed: the input ``x`` and the output ``y`` stay on the host,
because routing, gating and the scatter back into the hidden states are numpy.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import onnxruntime as ort

from swapmoe_edge.system.devices import CPU, CUDA
from swapmoe_edge.core.errors import InputError
from swapmoe_edge.artifact.store import ExpertStore, LoadedExpert

PLACEMENTS = ("auto", "host", "device")
_DEVICE_OF = {CUDA: "cuda", CPU: "cpu"}


def resolve_placement(requested: str, providers: list[str]) -> tuple[str, str]:
    """``(placement, ort_device)``: ``auto`` puts experts on the device when the first
    provider is CUDA (a discrete GPU or a Jetson's), else keeps them on the host."""
    if requested not in PLACEMENTS:
        raise InputError(f"unknown expert placement {requested!r}; choose one of {', '.join(PLACEMENTS)}")
    first = next((p for p in providers if p in _DEVICE_OF), CPU)
    device = _DEVICE_OF[first]
    if requested == "auto":
        requested = "device" if device != "cpu" else "host"
    return requested, device


class DeviceKernel:
    """Puts experts on one ORT device and runs the expert kernel session on them."""

    def __init__(self, session: ort.InferenceSession, device: str, device_id: int = 0):
        self.session = session
        self.device = device
        self.device_id = device_id

    def place(self, expert: LoadedExpert) -> LoadedExpert:
        feeds = {role: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, self.device_id)
                 for role, a in expert.feeds.items()}
        return replace(expert, feeds=feeds)

    def run(self, expert: LoadedExpert, x: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()  # one per call: the swapper and the token loop never share one
        binding.bind_cpu_input("x", np.ascontiguousarray(x))
        for role, value in expert.feeds.items():
            binding.bind_ortvalue_input(role, value)
        binding.bind_output("y", "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


class PlacingStore:
    """An ExpertStore whose reads come back placed on the device (flash -> host -> device)."""

    def __init__(self, store: ExpertStore, kernel: DeviceKernel):
        self.store = store
        self.kernel = kernel

    def read(self, key, own_mapping: bool = True) -> LoadedExpert:
        return self.kernel.place(self.store.read(key, own_mapping))

    def __getattr__(self, name: str) -> Any:  # counters(), manifest, bytes_read ... of the wrapped store
        return getattr(self.store, name)
