"""Expert placement (host arrays or device OrtValues) and provider options reaching ORT.

This machine has no GPU: the device path runs here with OrtValues on ``cpu`` (the same
IOBinding code that binds CUDA OrtValues), and the CUDA options are checked as far as the
point where they are handed to ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from swapmoe_edge.model import sessions as sessions_mod  # noqa: E402
from swapmoe_edge.system.devices import CPU, CUDA  # noqa: E402
from swapmoe_edge.core.errors import InputError  # noqa: E402
from swapmoe_edge.model.placement import resolve_placement  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402

from tiny import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    tiny_model(seed=41, num_experts=8).save_pretrained(root / "ckpt")
    return export_checkpoint(root / "ckpt", root / "art", quiet=True)


def _rows(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 90, n)] + [1] for n in (11, 6, 9)]


def test_resolve_placement():
    assert resolve_placement("auto", [CUDA, CPU]) == ("device", "cuda")
    assert resolve_placement("auto", [CPU]) == ("host", "cpu")
    assert resolve_placement("device", [CPU]) == ("device", "cpu")
    assert resolve_placement("host", [CUDA, CPU]) == ("host", "cuda")
    with pytest.raises(InputError, match="placement"):
        resolve_placement("gpu", [CPU])


@pytest.mark.parametrize("policy,budget", [("full", "auto"), ("swapmoe", "50%"), ("on-demand", "25%")])
def test_device_placed_experts_give_the_host_path_tokens(art, policy, budget):
    rows = _rows(3)
    got = {}
    for placement in ("host", "device"):
        with Runtime(art, RuntimeConfig(policy=policy, budget=budget, expert_placement=placement,
                                        swap_interval_s=3600)) as rt:
            res = rt.generate(rows, max_new_tokens=6)
            got[placement] = [r.token_ids for r in res]
            assert res[0].stats["expert_placement"] == placement
            if placement == "device":
                held = [e for lk in rt.sparse for e in rt.residents.layer(lk).values()]
                assert held and all(type(v).__name__ == "OrtValue" for e in held for v in e.feeds.values())
    assert got["device"] == got["host"]


def test_provider_options_reach_onnx_runtime(art, monkeypatch):
    seen = []
    real = sessions_mod.ort.InferenceSession

    def recording(path, sess_options=None, providers=None):
        seen.append(providers)
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(sessions_mod.ort, "InferenceSession", recording)
    sessions_mod.open_session(next(art.rglob("*.onnx")), sessions_mod.session_options(1), [CPU],
                              {CPU: {}, CUDA: {"gpu_mem_limit": "123"}})
    assert seen == [[(CPU, {})]]


def test_a_discrete_gpu_profile_caps_the_cuda_arena_at_a_byte_budget(art):
    # No CUDA here: the provider falls back to the CPU, and the options that a CUDA build
    # would receive are still derived from the profile and the budget.
    with Runtime(art, RuntimeConfig(policy="full", budget="3GiB", device="cuda-desktop")) as rt:
        assert rt.providers[-1] == CPU
        assert rt.provider_options[CUDA]["gpu_mem_limit"] == str(3 * 2**30)
        assert rt.provider_options[CUDA]["arena_extend_strategy"] == "kSameAsRequested"
        if CUDA not in rt.providers:
            assert rt.placement == "host" and rt.device_messages  # fell back, and said so
    with Runtime(art, RuntimeConfig(policy="full", budget="auto", device="jetson-orin-nano-8gb")) as rt:
        # unified memory: the RAM budget is the budget; no separate arena cap from the budget
        assert "gpu_mem_limit" not in rt.provider_options.get(CUDA, {})
