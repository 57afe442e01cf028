"""scripts/gpu_check.sh where there is no GPU: it checks its arguments, says so and exits 0;
bad arguments fail with a message; the install path fails clearly without a package index; and
its rehearsal (every step on the CPU provider) runs the real worker end to end on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    # python3 on PATH must be this interpreter (the script's default), whatever the caller's PATH says
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full = {**os.environ, "PATH": path, "NVIDIA_SMI": "/nonexistent/nvidia-smi", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=full,
                          cwd=REPO)


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu.json"
    res = run(str(out))
    assert res.returncode == 0, res.stderr
    assert "no CUDA on this machine" in res.stdout and "untested" in res.stdout
    assert not out.exists()  # no figures: nothing ran


def test_a_gpu_less_nvidia_smi_counts_as_no_cuda(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    smi.chmod(0o755)
    res = run(str(tmp_path / "gpu.json"), env={"NVIDIA_SMI": str(smi)})
    assert res.returncode == 0, res.stderr
    assert "lists no GPU" in res.stdout


@pytest.mark.parametrize("args, message", [
    ((), "the JSON output path is required"),
    (("{tmp}/gpu.txt",), "must be a .json file"),
    (("{tmp}/missing/gpu.json",), "does not exist"),
    (("{tmp}/gpu.json", "--shape", "switch-base-256"), "--shape must be switch-base-8 or tiny"),
    (("{tmp}/gpu.json", "--time-limit", "900"), "--time-limit must be whole seconds from 60 to 480"),
    (("{tmp}/gpu.json", "--time-limit", "ten"), "--time-limit must be whole seconds"),
    (("{tmp}/gpu.json", "--wheels", "{tmp}/nowhere"), "is not a folder"),
    (("{tmp}/gpu.json", "--frobnicate"), "unknown option --frobnicate"),
    (("{tmp}/gpu.json", "{tmp}/other.json"), "one output path only"),
    (("{tmp}/gpu.json", "--work"), "--work needs a value"),
])
def test_bad_arguments_fail_with_a_message(tmp_path, args, message):
    res = run(*(a.format(tmp=tmp_path) for a in args))
    assert res.returncode == 2
    assert message in res.stderr and "usage:" in res.stderr
    assert not list(tmp_path.glob("*.json"))


def test_help_exits_0():
    res = run("--help")
    assert res.returncode == 0 and "OUT.json" in res.stdout


@pytest.mark.slow
def test_without_a_package_index_the_install_fails_clearly(tmp_path):
    """A GPU (a stand-in nvidia-smi), a python without onnxruntime-gpu and an empty wheel folder:
    the venv is made, pip finds nothing, and the script says what to bring."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncase \"$*\" in -L) echo 'GPU 0: Stand-in (UUID: GPU-0)';; *) echo 'Stand-in, 1.0, 1 MiB';; esac\n")
    smi.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    res = run(str(tmp_path / "gpu.json"), "--venv", str(tmp_path / "venv"), "--wheels", str(wheels),
              env={"NVIDIA_SMI": str(smi), "PYTHON": sys.executable})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "could not install onnxruntime-gpu" in res.stdout and "--wheels DIR" in res.stdout
    # the venv sees the calling python's packages after its own
    pth = next((tmp_path / "venv").glob("lib/python*/site-packages/gpu_check_outer.pth"))
    assert any(Path(p).is_dir() for p in pth.read_text().split())


@pytest.mark.slow
def test_rehearsal_runs_every_cell_on_the_cpu(tmp_path):
    out = tmp_path / "rehearsal.json"
    res = run(str(out), "--shape", "tiny", "--rehearsal", "--quick", "--work", str(tmp_path / "work"), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["rehearsal"] is True and d["gpu"] is None and "REHEARSAL" in d["note"]
    assert d["problems"] == []
    assert d["artifact"]["dtype"] == "float16" and d["artifact"]["ladder"] == ["int4"]
    assert set(d["cells"]) == {"cpu/full", "cpu/ladder", "cpu-standin/full", "cpu-standin/ladder", "cpu-standin/prune",
                               "cpu-standin/on-demand", "cpu-standin/prune-bytes", "cpu-standin/ladder-int4",
                               "cpu/ladder-int4", "cpu-standin/full-int4dense", "cpu/full-int4dense"}
    for name, c in d["cells"].items():
        assert c["decode_ms_per_token"] > 0 and len(c["timed"]) == 2 and len(c["greedy"]) == 1, name
        assert c["graphs_on"] == {"CPUExecutionProvider": sum(c["graphs_on"].values())}
    assert d["cells"]["cpu/full"]["first_choice_resident"] == 1.0
    assert d["cells"]["cpu-standin/prune"]["first_choice_resident"] < 1.0  # 33%: tokens rerouted
    assert not any(g["exact"] for c in d["cells"].values() for g in c["greedy"])  # float16 experts: lossy
    assert d["cells"]["cpu-standin/ladder"]["placement"] == "host"
    # the byte budget is the prune share cell's cap, 5% over
    assert int(d["cells"]["cpu-standin/prune-bytes"]["budget"]) == int(d["cells"]["cpu-standin/prune"]["budget_bytes"] * 1.05)
    int4 = d["cells"]["cpu-standin/ladder-int4"]["residents_by_rung"]
    assert int4 == {"int4": sum(int4.values())} and int4["int4"] > 0  # every expert as its int4 copy
    # The same provider on both sides: every token and every router logit the same, where the
    # resident plans are the same (the ladder's at 33% follows copy costs measured per process).
    assert d["cells"]["cpu/full-int4dense"]["artifact"].endswith("art-int4dense")
    assert any("--dtype" in c and "int4" in c for c in d["commands"])
    for key in ("cpu-standin/full vs cpu/full", "cpu-standin/ladder vs cpu/ladder", "cpu-standin/ladder-int4 vs cpu/ladder-int4",
                "cpu-standin/full-int4dense vs cpu/full-int4dense"):
        c = d["comparisons"][key]
        assert c["requests"] == 1 and c["router_rows_compared"] > 0
        if "/ladder " not in key:
            assert c["same_resident_plan"], key
        if c["same_resident_plan"]:
            assert c["same_tokens"] == 1 and c["router_top1_agreement"] == 1.0
            assert c["router_logits_max_abs_diff"] == 0.0
    assert d["memory"] == {}  # no nvidia-smi readings in a rehearsal


def _worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_worker", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_budget_verdict_counts_beyond_the_context():
    g = _worker()
    mib = 2**20
    res = {"dense_file_bytes": 100 * mib, "resident_expert_bytes": 50 * mib, "budget_bytes": 400 * mib,
           "provider_options": {g.CUDA: {"gpu_mem_limit": str(400 * mib)}}}
    over = g._budget_verdict(res, {"peak_process_mib": 800.0, "peak_total_mib": 9000.0}, 300.0)
    assert over["holds"] is False and over["beyond_context_mib"] == 500.0 and "EXCEEDED" in over["summary"]
    assert over["over_dense_plus_experts"] == round(500 / 150, 3) and over["gpu_mem_limit"] == str(400 * mib)
    # No process table: the whole GPU's peak over its use before the cell.
    whole = g._budget_verdict(res, {"peak_process_mib": None, "peak_total_mib": 1500.0, "idle_total_mib": 1000.0}, 300.0)
    assert whole["holds"] is True and whole["beyond_context_mib"] == 200.0 and "whole GPU" in whole["source"]
    assert g._budget_verdict(res, {"peak_process_mib": None, "peak_total_mib": None}, 300.0)["holds"] is None


def test_nvidia_smi_readings(tmp_path, monkeypatch):
    g = _worker()
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncase \"$*\" in\n  *compute-apps*) echo '11, 100'; echo '4242, 2048';;\n"
                   "  *name,driver*) echo 'H, 580.1, 81559, 7';;\n  *memory.used*) echo '1234';;\nesac\n")
    smi.chmod(0o755)
    monkeypatch.setenv("NVIDIA_SMI", str(smi))
    assert g.process_mib(4242) == 2048.0 and g.process_mib(5) is None
    assert g.used_mib() == 1234.0
    assert g.gpu_info() == {"name": "H", "driver": "580.1", "memory_total_mib": 81559.0, "memory_used_mib": 7.0, "gpus": 1}
    monkeypatch.setenv("NVIDIA_SMI", str(tmp_path / "missing"))
    assert g.process_mib(4242) is None and g.used_mib() is None and g.gpu_info() is None


def test_compare_finds_the_first_different_token(tmp_path):
    import numpy as np

    g = _worker()
    a = {"greedy": [{"tokens": [5, 6, 7]}, {"tokens": [1, 2]}], "resident_plan": {"x": 1}}
    b = {"greedy": [{"tokens": [5, 9, 7]}, {"tokens": [1, 2]}], "resident_plan": {"x": 1}}
    logits = np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)
    np.savez(tmp_path / "a.npz", r0_0_enc=logits, r0_1_dec=logits)
    np.savez(tmp_path / "b.npz", r0_0_enc=logits + [[0.0, 0.5], [0.0, 3.0]], r0_1_dec=np.zeros((3, 2), np.float32))
    c = g._compare(a, b, tmp_path / "a.npz", tmp_path / "b.npz")
    assert c["same_tokens"] == 1 and c["first_difference"] == [1, None] and c["same_resident_plan"]
    # only the call whose shapes match is compared: row 2's top-1 flips
    assert c["router_rows_compared"] == 2 and c["router_top1_agreement"] == 0.5
    assert c["router_logits_max_abs_diff"] == 3.0
