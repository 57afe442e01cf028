"""Device profiles: what a board offers (memory, flash, execution providers) and how to recognise it.

Profiles live in ``devices/*.json`` (package ``swapmoe_devices``), one per board; a copy
edited for your machine can be passed by path. Detection is a pure function of a few
facts read from the system, so tests can play any board:

    profile = detect_profile()                     # or get_profile("jetson-orin-nano-8gb")
    providers, messages = select_providers(profile)
    options = provider_options(profile, budget_bytes)
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import onnxruntime as ort
import psutil

from swapmoe_edge.core.errors import InputError

try:
    from swapmoe_devices import PROFILE_DIR
except ImportError:  # a source checkout that was not (re)installed
    PROFILE_DIR = Path(__file__).resolve().parents[2] / "devices"

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
FALLBACK = "cpu-x86_64"  # for machines that no profile matches
_DTYPES = ("float16", "float32", "int8", "int4")
_ARENA = ("kSameAsRequested", "kNextPowerOfTwo")
_OPTIONAL = {"dense_dtype": "float32", "dense_dtype_why": ""}  # profile fields a file may leave out
_DETECT_KEYS = {"model_contains", "tegra_release", "memory_gib", "machine", "nvidia_driver"}


@dataclass(frozen=True)
class DetectRule:
    """How to recognise a board. Hard rules must hold; ``memory_gib`` only breaks ties.

    ``model_contains``: substrings of /proc/device-tree/model (any one, case-insensitive).
    ``tegra_release``: L4T majors ("R36") from /etc/nv_tegra_release; used when the
    device tree is missing. ``memory_gib``: [low, high) of total memory, high may be
    null. ``machine``: values of platform.machine(). ``nvidia_driver``: the NVIDIA
    kernel driver of a discrete GPU is loaded.
    """

    model_contains: tuple[str, ...] = ()
    tegra_release: tuple[str, ...] = ()
    memory_gib: tuple[float, float | None] | None = None
    machine: tuple[str, ...] = ()
    nvidia_driver: bool = False


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    memory_bytes: int | None  # nominal; None = read from the machine
    unified_memory: bool  # CPU and GPU share DRAM: the RAM budget is the GPU budget
    reserve_bytes: int  # kept free for the OS and other apps
    flash_read_mb_s: float  # typical sequential read of the artifact's storage
    providers: tuple[str, ...]  # ONNX Runtime execution providers, best first, CPU last
    expert_dtype: str
    threads: int | None  # None = ONNX Runtime's default (all cores)
    gpu_memory_limit_bytes: int | None  # CUDA EP arena limit; None = derive from the budget
    arena_extend_strategy: str
    provider_hint: str | None  # what to install when a GPU provider is missing
    detect: DetectRule
    notes: tuple[str, ...]
    # The dense weights' type to export for this board (``swapmoe export --dtype``), and why in
    # one sentence; optional in a profile file (default float32, no reason given).
    dense_dtype: str = "float32"
    dense_dtype_why: str = ""

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["providers"], d["notes"] = list(self.providers), list(self.notes)
        d["detect"] = {k: list(v) if isinstance(v, tuple) else v
                       for k, v in ((f.name, getattr(self.detect, f.name)) for f in fields(DetectRule)) if v}
        return d


# -- loading ------------------------------------------------------------------------------------
def _int_or_none(where: str, key: str, v: Any, minimum: int) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InputError(f"{where}: {key} must be an integer >= {minimum} or null, not {v!r}")
    return v


def _strings(where: str, key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise InputError(f"{where}: {key} must be a list of non-empty strings, not {v!r}")
    return tuple(v)


def _rule(where: str, d: Any) -> DetectRule:
    if not isinstance(d, dict):
        raise InputError(f"{where}: detect must be an object, not {d!r}")
    unknown = set(d) - _DETECT_KEYS
    if unknown:
        raise InputError(f"{where}: unknown detect rule(s) {sorted(unknown)}; known: {sorted(_DETECT_KEYS)}")
    mem = d.get("memory_gib")
    if mem is not None:
        ok = (isinstance(mem, list) and len(mem) == 2 and isinstance(mem[0], (int, float))
              and (mem[1] is None or (isinstance(mem[1], (int, float)) and mem[1] > mem[0])))
        if not ok:
            raise InputError(f"{where}: detect.memory_gib must be [low, high] in GiB with high > low or null, not {mem!r}")
        mem = (float(mem[0]), None if mem[1] is None else float(mem[1]))
    if not isinstance(d.get("nvidia_driver", False), bool):
        raise InputError(f"{where}: detect.nvidia_driver must be true or false")
    return DetectRule(
        model_contains=_strings(where, "detect.model_contains", d.get("model_contains", [])),
        tegra_release=_strings(where, "detect.tegra_release", d.get("tegra_release", [])),
        memory_gib=mem,
        machine=tuple(s.lower() for s in _strings(where, "detect.machine", d.get("machine", []))),
        nvidia_driver=d.get("nvidia_driver", False),
    )


def profile_from_dict(d: Any, where: str = "device profile") -> DeviceProfile:
    """Validate one profile's JSON object; every problem names the file and the field."""
    if not isinstance(d, dict):
        raise InputError(f"{where}: a device profile must be a JSON object")
    names = {f.name for f in fields(DeviceProfile)}
    missing, unknown = names - set(d) - set(_OPTIONAL), set(d) - names
    if missing or unknown:
        raise InputError(f"{where}: missing field(s) {sorted(missing)}, unknown field(s) {sorted(unknown)}; "
                         f"a profile has exactly {sorted(names)}")
    for key in ("name", "description"):
        if not isinstance(d[key], str) or not d[key].strip():
            raise InputError(f"{where}: {key} must be a non-empty string")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", d["name"]):
        raise InputError(f"{where}: name {d['name']!r} must be lower-case letters, digits, '-', '_' or '.'")
    if not isinstance(d["unified_memory"], bool):
        raise InputError(f"{where}: unified_memory must be true or false")
    flash = d["flash_read_mb_s"]
    if isinstance(flash, bool) or not isinstance(flash, (int, float)) or flash <= 0:
        raise InputError(f"{where}: flash_read_mb_s must be a positive number, not {flash!r}")
    providers = _strings(where, "providers", d["providers"])
    if len(set(providers)) != len(providers) or providers[-1] != CPU \
            or not all(p.endswith("ExecutionProvider") for p in providers):
        raise InputError(f"{where}: providers must be distinct ONNX Runtime execution provider names, best first, "
                         f"ending with {CPU}; got {list(providers)}")
    if d["expert_dtype"] not in _DTYPES:
        raise InputError(f"{where}: expert_dtype must be one of {_DTYPES}, not {d['expert_dtype']!r}")
    if d["arena_extend_strategy"] not in _ARENA:
        raise InputError(f"{where}: arena_extend_strategy must be one of {_ARENA}, not {d['arena_extend_strategy']!r}")
    hint = d["provider_hint"]
    if hint is not None and (not isinstance(hint, str) or not hint.strip()):
        raise InputError(f"{where}: provider_hint must be a non-empty string or null")
    dense = d.get("dense_dtype", _OPTIONAL["dense_dtype"])
    if dense not in _DTYPES:
        raise InputError(f"{where}: dense_dtype must be one of {_DTYPES}, not {dense!r}")
    why = d.get("dense_dtype_why", _OPTIONAL["dense_dtype_why"])
    if not isinstance(why, str):
        raise InputError(f"{where}: dense_dtype_why must be a string (one sentence: why this dense type suits the board)")
    reserve = _int_or_none(where, "reserve_bytes", d["reserve_bytes"], 0)
    if reserve is None:
        raise InputError(f"{where}: reserve_bytes must be an integer >= 0, not null")
    return DeviceProfile(
        name=d["name"],
        description=d["description"],
        memory_bytes=_int_or_none(where, "memory_bytes", d["memory_bytes"], 1),
        unified_memory=d["unified_memory"],
        reserve_bytes=reserve,
        flash_read_mb_s=float(flash),
        providers=providers,
        expert_dtype=d["expert_dtype"],
        threads=_int_or_none(where, "threads", d["threads"], 1),
        gpu_memory_limit_bytes=_int_or_none(where, "gpu_memory_limit_bytes", d["gpu_memory_limit_bytes"], 1),
        arena_extend_strategy=d["arena_extend_strategy"],
        provider_hint=hint,
        detect=_rule(where, d["detect"]),
        notes=_strings(where, "notes", d["notes"]),
        dense_dtype=dense,
        dense_dtype_why=why,
    )


def load_profile(path: str | Path) -> DeviceProfile:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read device profile {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"device profile {path} is not valid JSON (UTF-8 text): {e}") from e
    return profile_from_dict(data, where=f"device profile {path}")


def list_profiles() -> list[DeviceProfile]:
    """Every shipped profile, by name; a file whose name differs from its ``name`` is an error."""
    profiles = []
    for path in sorted(Path(PROFILE_DIR).glob("*.json")):
        prof = load_profile(path)
        if prof.name != path.stem:
            raise InputError(f"device profile {path}: name {prof.name!r} differs from the file name {path.stem!r}")
        profiles.append(prof)
    return profiles


def get_profile(name: str) -> DeviceProfile:
    """A shipped profile by name, or a profile file by path (``my-board.json``)."""
    if name.endswith(".json") or "/" in name:
        return load_profile(name)
    path = Path(PROFILE_DIR) / f"{name}.json"
    if not path.is_file():
        known = ", ".join(p.name for p in list_profiles())
        raise InputError(f"unknown device {name!r}; known devices: {known} (or give the path of a profile .json file)")
    return load_profile(path)


# -- detection ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SystemFacts:
    """What detection looks at; ``tegra_release`` is "" when the file exists but is unreadable."""

    model: str  # /proc/device-tree/model without its trailing NUL; "" when absent
    tegra_release: str | None  # L4T major ("R36"); None when /etc/nv_tegra_release is absent
    l4t_version: str | None  # "36.3.0" when the file says so
    machine: str
    total_memory: int
    nvidia_driver: bool


_TEGRA_RE = re.compile(r"#\s*(R\d+)\s*\(release\)\s*,\s*REVISION:\s*([\d.]+)", re.IGNORECASE)


def _read_text(path: str | Path) -> str | None:
    try:
        return Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def read_facts(model_path: str | Path = "/proc/device-tree/model", tegra_path: str | Path = "/etc/nv_tegra_release",
               machine: str | None = None, total_memory: int | None = None,
               nvidia_path: str | Path = "/proc/driver/nvidia/gpus") -> SystemFacts:
    model = (_read_text(model_path) or "").strip("\x00 \t\r\n")  # the device-tree string ends with NUL
    tegra = _read_text(tegra_path)
    release = version = None
    if tegra is not None:
        m = _TEGRA_RE.search(tegra)
        release = m.group(1).upper() if m else ""
        version = f"{m.group(1)[1:]}.{m.group(2)}" if m else None
    if total_memory is None:
        total_memory = int(psutil.virtual_memory().total)
    try:
        driver = any(Path(nvidia_path).iterdir())
    except OSError:
        driver = False
    return SystemFacts(model, release, version, (machine or platform.machine()).lower(), int(total_memory), driver)


def _score(rule: DetectRule, facts: SystemFacts) -> tuple[int, int, int] | None:
    """(evidence level, specificity, memory fits), or None if a hard rule fails.

    The most specific evidence wins: device-tree model (3) > L4T release without a
    device tree (2) > NVIDIA driver (1) > CPU architecture (0); then the longest
    model substring; then whether total memory is in the profile's range.
    """
    gib = facts.total_memory / 2**30
    lo, hi = rule.memory_gib or (0.0, None)
    memory_fits = int(lo <= gib and (hi is None or gib < hi))
    if rule.model_contains:
        if facts.model:
            hits = [s for s in rule.model_contains if s.lower() in facts.model.lower()]
            return (3, max(map(len, hits)), memory_fits) if hits else None
        if facts.tegra_release is None or not rule.tegra_release:
            return None
        # No device tree (some containers): the L4T release still says which family; "" = unreadable.
        if facts.tegra_release and facts.tegra_release not in rule.tegra_release:
            return None
        return (2, 0, memory_fits)
    if rule.machine and facts.machine not in rule.machine:
        return None
    if rule.nvidia_driver:
        return (1, 0, memory_fits) if facts.nvidia_driver else None
    return (0, 0, memory_fits) if rule.machine else None


def match_profile(facts: SystemFacts, profiles: Sequence[DeviceProfile]) -> DeviceProfile:
    """The profile whose rules fit ``facts`` best; the generic CPU profile when none does."""
    def closeness(p: DeviceProfile) -> float:  # last tie-break: nominal memory nearest the machine's
        return -abs(p.memory_bytes - facts.total_memory) if p.memory_bytes else float("-inf")

    scored = [((*s, closeness(p)), p) for p in profiles if (s := _score(p.detect, facts)) is not None]
    if not scored:
        by_name = {p.name: p for p in profiles}
        assert FALLBACK in by_name, f"the fallback profile {FALLBACK} is not shipped"
        return by_name[FALLBACK]
    return max(scored, key=lambda sp: (sp[0], sp[1].name))[1]


def detect_profile(model_path: str | Path = "/proc/device-tree/model", tegra_path: str | Path = "/etc/nv_tegra_release",
                   machine: str | None = None, total_memory: int | None = None,
                   nvidia_path: str | Path = "/proc/driver/nvidia/gpus") -> DeviceProfile:
    """The shipped profile that matches this machine (paths and facts injectable for tests)."""
    facts = read_facts(model_path, tegra_path, machine, total_memory, nvidia_path)
    return match_profile(facts, list_profiles())


# -- providers ----------------------------------------------------------------------------------
def select_providers(profile: DeviceProfile, available: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """The profile's providers that this onnxruntime build offers, in order, ending with CPU.

    Returns ``(providers, messages)``: one message per provider the build lacks, saying
    what to install and what runs instead.
    """
    if available is None:
        available = ort.get_available_providers()
    offered = set(available) | {CPU}  # every build has the CPU provider
    chosen = [p for p in profile.providers if p in offered]
    messages = []
    for i, p in enumerate(profile.providers):
        if p in offered:
            continue
        instead = next(q for q in profile.providers[i + 1:] if q in offered)
        hint = f": {profile.provider_hint}" if profile.provider_hint else ""
        messages.append(f"{p} is not in this onnxruntime build (it offers {', '.join(available) or 'nothing'})"
                        f"{hint}; falling back to {instead}")
    assert chosen[-1] == CPU, "profiles end with the CPU provider, which every build has"
    return chosen, messages


def provider_options(profile: DeviceProfile, budget_bytes: int | None = None) -> dict[str, dict[str, str]]:
    """ONNX Runtime options per provider, for ``[(p, opts.get(p, {})) for p in providers]``.

    CUDA: the arena grows by what is asked (``kSameAsRequested``; the default doubles)
    and stops at ``gpu_memory_limit_bytes`` or, when that is null, at the budget.
    """
    opts: dict[str, dict[str, str]] = {}
    if CUDA in profile.providers:
        cuda = {"arena_extend_strategy": profile.arena_extend_strategy}
        limit = profile.gpu_memory_limit_bytes or budget_bytes
        if limit is not None:
            if limit <= 0:
                raise InputError(f"the CUDA memory limit must be positive, not {limit} bytes")
            cuda["gpu_mem_limit"] = str(int(limit))
        opts[CUDA] = cuda
    return opts
