"""The benchmarks that price a low-bit token against its floor run end to end on small inputs:
the cold kernel chains, a decoded token's profile by part, and two steps as one graph."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _run(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=SCRIPTS)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cold_kernel_chains_price_every_kernel_against_float32(tmp_path):
    out = tmp_path / "cold.json"
    _run(["bench_nbits_kernels.py", "--cold", "--pairs", "1", "--rounds", "1", "--json", str(out)])
    v = json.loads(out.read_text())["variants"]
    assert set(v) == {"float32", "int8 b32 a4", "int8 b64 a4", "int8 b128 a4", "int4 b32 a4", "int4 b64 a4", "int4 b128 a4",
                      "int4 b32 a0"}
    assert v["float32"]["x_floor"] == 1.0
    weights = 2 * 768 * 3072  # one pair
    assert v["float32"]["weight_mb"] == round(weights * 4 / 1e6, 1)
    assert v["int4 b32 a4"]["weight_mb"] == round(weights * (0.5 + 4 / 32) / 1e6, 1)  # nibbles + a float32 scale per 32
    assert v["int8 b128 a4"]["weight_mb"] == round(weights * (1 + 4 / 128) / 1e6, 1)
    for row in v.values():
        assert row["gb_per_s"] > 0 and row["cached_gb_per_s"] > 0
        assert row["x_floor"] == pytest.approx(v["float32"]["gb_per_s"] / row["gb_per_s"], rel=0.01)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    pytest.importorskip("torch")
    from swapmoe_edge.runtime import embedded
    from swapmoe_export import export_checkpoint

    mp = pytest.MonkeyPatch()
    mp.setenv("SWAPMOE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    try:
        yield embedded.default_artifact(export_checkpoint, quiet=True, validate=False)
    finally:
        mp.undo()


def test_decode_profile_splits_a_token_by_part_and_operator(artifact, tmp_path):
    out = tmp_path / "decode.json"
    _run(["bench_step_nodes.py", str(artifact), "--decode", "4", "--json", str(out)])
    (r,) = json.loads(out.read_text())
    ms = r["ms_per_token"]
    assert r["unprofiled_ms_per_token"] > 0
    assert ms["decode() total"] > 0 and ms["ort:step"] > 0 and ms["ort:lm_head"] > 0
    steps, head = r["nodes_us_per_token"]["step"], r["nodes_us_per_token"]["lm_head"]
    assert "MultiHeadAttention" in steps and any(op.endswith("MatMul") for op in steps)
    assert head
    # the nodes run inside the calls that time them
    assert sum(steps.values()) / 1e3 <= ms["ort:step"] * 1.05
    assert sum(head.values()) / 1e3 <= ms["ort:lm_head"] * 1.05


def test_two_steps_as_one_graph_are_timed_against_two_calls(artifact, tmp_path):
    from swapmoe_edge.artifact.manifest import load_manifest

    steps = sorted(n for n in load_manifest(artifact).subgraphs if n.startswith("dec.") and n.endswith(".step"))[:2]
    out = tmp_path / "pair.json"
    _run(["bench_step_nodes.py", str(artifact), "--pair", ",".join(steps), "--calls", "20", "--json", str(out)])
    (r,) = json.loads(out.read_text())
    assert r["layers"] == steps
    assert r["us"]["two calls"] > 0 and r["us"]["one graph"] > 0
    assert r["one_over_two"] == pytest.approx(r["us"]["one graph"] / r["us"]["two calls"])
