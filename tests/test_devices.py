"""Device profiles: every shipped one is valid, boards are recognised, providers fall back clearly."""

import json
import re

import pytest
from click.testing import CliRunner

from swapmoe_edge.system.devices import (PROFILE_DIR, detect_profile, get_profile, list_profiles, load_profile,
                                  profile_from_dict, provider_options, select_providers)
from swapmoe_edge.core.errors import InputError

GIB = 2**30
SHIPPED = {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb",
           "jetson-nano-4gb", "cpu-x86_64", "cpu-arm64", "cuda-desktop"}
R36 = "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 17:34:21 UTC 2024\n"
R35 = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n"
R32 = "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022\n"


def detect(tmp_path, model=None, tegra=None, machine="aarch64", memory_gib=8.0, gpus=0):
    """Detect with fixture files standing in for /proc and /etc; None = the file is absent."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    model_path, tegra_path, gpu_dir = tmp_path / "model", tmp_path / "nv_tegra_release", tmp_path / "gpus"
    if model is not None:
        model_path.write_bytes(model.encode() + b"\x00")  # the device-tree string ends with NUL
    if tegra is not None:
        tegra_path.write_text(tegra)
    for i in range(gpus):
        (gpu_dir / f"0000:0{i}:00.0").mkdir(parents=True)
    return detect_profile(model_path, tegra_path, machine=machine, total_memory=int(memory_gib * GIB),
                          nvidia_path=gpu_dir).name


def test_every_shipped_profile_loads_and_is_valid():
    profiles = list_profiles()
    assert {p.name for p in profiles} == SHIPPED
    for p in profiles:
        assert (PROFILE_DIR / f"{p.name}.json").is_file()
        assert p.providers[-1] == "CPUExecutionProvider"
        assert p.reserve_bytes > 0 and p.flash_read_mb_s > 0 and p.notes
        gpu = "CUDAExecutionProvider" in p.providers
        assert p.expert_dtype == ("float16" if gpu else "float32"), p.name
        assert p.unified_memory == p.name.startswith("jetson-"), p.name
        assert gpu == (p.provider_hint is not None), p.name
        if p.unified_memory:
            assert p.memory_bytes and p.detect.model_contains and p.detect.tegra_release and p.detect.memory_gib
        assert get_profile(p.name) == p
    nano = get_profile("jetson-orin-nano-8gb")
    assert nano.arena_extend_strategy == "kSameAsRequested"
    assert any("memory pools" in n for n in nano.notes)


@pytest.mark.parametrize("model, tegra, memory_gib, expected", [
    ("NVIDIA Jetson Orin Nano Developer Kit", R36, 7.4, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", R36, 7.4, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", R35, 15.3, "jetson-orin-nx-16gb"),
    ("Jetson AGX Orin", R35, 30.6, "jetson-agx-orin-32gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", R36, 61.4, "jetson-agx-orin-64gb"),
    ("NVIDIA Jetson Nano Developer Kit", R32, 3.9, "jetson-nano-4gb"),
])
def test_jetson_boards_are_recognised_by_device_tree_model(tmp_path, model, tegra, memory_gib, expected):
    assert detect(tmp_path, model=model, tegra=tegra, memory_gib=memory_gib) == expected


def test_the_device_tree_decides_even_without_the_l4t_file_or_with_an_unexpected_release(tmp_path):
    assert detect(tmp_path / "a", model="NVIDIA Jetson Orin Nano Developer Kit", tegra=None) == "jetson-orin-nano-8gb"
    assert detect(tmp_path / "b", model="NVIDIA Jetson Orin Nano Developer Kit", tegra="# R38 (release), REVISION: 0.0") \
        == "jetson-orin-nano-8gb"


@pytest.mark.parametrize("tegra, memory_gib, expected", [
    (R36, 7.4, "jetson-orin-nano-8gb"),
    (R36, 15.3, "jetson-orin-nx-16gb"),
    (R35, 30.6, "jetson-agx-orin-32gb"),
    (R36, 61.4, "jetson-agx-orin-64gb"),
    (R32, 3.9, "jetson-nano-4gb"),
    ("garbled", 30.6, "jetson-agx-orin-32gb"),  # present but unreadable: presence and memory decide
])
def test_without_a_device_tree_the_l4t_release_and_memory_decide(tmp_path, tegra, memory_gib, expected):
    assert detect(tmp_path, model=None, tegra=tegra, memory_gib=memory_gib) == expected


def test_generic_machines_fall_back_to_their_cpu_profile(tmp_path):
    assert detect(tmp_path / "x", machine="x86_64", memory_gib=31.2) == "cpu-x86_64"
    assert detect(tmp_path / "a", machine="aarch64", memory_gib=7.6) == "cpu-arm64"  # e.g. a Raspberry Pi
    assert detect(tmp_path / "p", model="Raspberry Pi 5 Model B Rev 1.0", machine="aarch64") == "cpu-arm64"
    assert detect(tmp_path / "r", machine="riscv64") == "cpu-x86_64"  # nothing matches: the fallback
    assert detect(tmp_path / "g", machine="x86_64", memory_gib=64, gpus=1) == "cuda-desktop"


def test_an_unknown_profile_name_lists_the_known_ones():
    with pytest.raises(InputError) as e:
        get_profile("jetson-xavier")
    assert "jetson-xavier" in str(e.value)
    for name in SHIPPED:
        assert name in str(e.value)


def test_a_profile_file_given_by_path_is_loaded_and_bad_fields_are_named(tmp_path):
    data = json.loads((PROFILE_DIR / "jetson-agx-orin-32gb.json").read_text())
    data.update(name="my-agx-on-nvme", flash_read_mb_s=2500)
    (tmp_path / "mine.json").write_text(json.dumps(data))
    assert get_profile(str(tmp_path / "mine.json")).flash_read_mb_s == 2500
    for bad, word in [({"providers": ["CUDAExecutionProvider"]}, "providers"),
                      ({"expert_dtype": "int3"}, "expert_dtype"),
                      ({"reserve_bytes": -1}, "reserve_bytes"),
                      ({"detect": {"model_contain": ["x"]}}, "model_contain"),
                      ({"detect": {"memory_gib": [48, 24]}}, "memory_gib"),
                      ({"extra": 1}, "extra")]:
        with pytest.raises(InputError, match=word):
            profile_from_dict({**data, **bad}, where="mine.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_profile(tmp_path / "broken.json")


def test_missing_cuda_falls_back_to_cpu_with_a_message_naming_the_wheel():
    orin = get_profile("jetson-orin-nano-8gb")
    providers, messages = select_providers(orin, available=["AzureExecutionProvider", "CPUExecutionProvider"])
    assert providers == ["CPUExecutionProvider"]
    assert len(messages) == 2  # TensorRT and CUDA
    cuda = next(m for m in messages if m.startswith("CUDAExecutionProvider"))
    assert "onnxruntime-gpu wheel" in cuda and "JetPack" in cuda and cuda.endswith("falling back to CPUExecutionProvider")
    trt = next(m for m in messages if m.startswith("TensorrtExecutionProvider"))
    assert trt.endswith("falling back to CPUExecutionProvider")


def test_available_providers_keep_the_profile_order_and_cpu_comes_last():
    desk = get_profile("cuda-desktop")
    every = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert select_providers(desk, available=every) == (
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], [])
    providers, messages = select_providers(desk, available=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert len(messages) == 1 and messages[0].endswith("falling back to CUDAExecutionProvider")
    assert select_providers(get_profile("cpu-x86_64"), available=[]) == (["CPUExecutionProvider"], [])


def test_cuda_options_bound_the_arena_by_the_budget_unless_the_profile_sets_a_limit():
    orin = get_profile("jetson-orin-nano-8gb")
    assert provider_options(orin, 5 * GIB) == {"CUDAExecutionProvider": {
        "arena_extend_strategy": "kSameAsRequested", "gpu_mem_limit": str(5 * GIB)}}
    assert "gpu_mem_limit" not in provider_options(orin)["CUDAExecutionProvider"]
    fixed = profile_from_dict({**get_profile("cuda-desktop").to_json(), "gpu_memory_limit_bytes": 3 * GIB})
    assert provider_options(fixed, 5 * GIB)["CUDAExecutionProvider"]["gpu_mem_limit"] == str(3 * GIB)
    assert provider_options(get_profile("cpu-arm64"), GIB) == {}


def test_devices_command_marks_exactly_one_profile():
    from swapmoe_edge.cli.main import main

    r = CliRunner().invoke(main, ["devices"])
    assert r.exit_code == 0, r.output
    marked = [ln for ln in r.output.splitlines() if ln.startswith("*")]
    assert len(marked) == 1 and marked[0].split()[1] in SHIPPED
    here = get_profile(marked[0].split()[1])
    assert re.split(r"\s{2,}", marked[0])[7] == here.dense_dtype  # the dense column
    assert f"dense weights for this board: {here.dense_dtype} (swapmoe export --dtype {here.dense_dtype})" in r.output
    r = CliRunner().invoke(main, ["devices", "--json"])
    obj = json.loads(r.output)
    assert obj["detected"] in SHIPPED and {p["name"] for p in obj["profiles"]} == SHIPPED
    assert obj["providers"][-1] == "CPUExecutionProvider"


def test_the_runtime_takes_providers_and_reserve_from_the_device_and_reports_them(tmp_path):
    pytest.importorskip("torch")
    from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig
    from swapmoe_export import export_checkpoint
    from tiny import save_tiny

    art = tmp_path / "art"
    export_checkpoint(save_tiny(tmp_path / "ckpt"), art, validate=False, quiet=True)
    with pytest.raises(InputError, match="known devices"):
        Runtime(art, RuntimeConfig(device="jetson-xavier"))
    orin = get_profile("jetson-orin-nano-8gb")
    with Runtime(art, RuntimeConfig(policy="full", device=orin.name)) as rt:  # this onnxruntime is the CPU build
        assert rt.monitor.reserve == orin.reserve_bytes
        expected, messages = select_providers(orin)
        assert rt.device_messages == messages and rt.sessions.providers == expected
        stats = rt.generate([[5, 6, 7, 1]], max_new_tokens=2)[0].stats
    assert stats["device"] == orin.name and stats["providers"] == expected
    with Runtime(art, RuntimeConfig(policy="full", device="cpu-arm64", reserve_bytes=123 << 20)) as rt:
        assert rt.monitor.reserve == 123 << 20 and rt.device_messages == []
