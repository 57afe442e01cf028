"""The budget: parsing, the fit check, and the live monitor (with injected memory readings)."""

import threading
import time

import pytest

from swapmoe_edge.core.keys import LayerKey
from swapmoe_edge.residency.planner import expert_capacity
from swapmoe_edge.system.budget import BudgetSpec, MemoryMonitor, parse_budget
from swapmoe_edge.core.units import GIB, MIB, format_size, parse_size
from swapmoe_edge.core.errors import BudgetError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("123456", 123456),
        ("512MiB", 512 * MIB),
        ("4.7GiB", int(4.7 * GIB)),
        ("2GB", 2 * 10**9),
        ("1.5G", int(1.5 * GIB)),
        ("64k", 64 * 1024),
        (" 3 mib ", 3 * MIB),
        ("10B", 10),
    ],
)
def test_parse_size_reads_binary_and_decimal_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "4.7 GiBs", "1,5G", "abc", "5%"])
def test_parse_size_rejects_garbage_and_names_the_accepted_forms(text):
    with pytest.raises(BudgetError, match="512MiB"):
        parse_size(text)


def test_byte_budget_is_the_whole_process_cap():
    spec = parse_budget("4.7GiB")
    assert spec == BudgetSpec("bytes", nbytes=int(4.7 * GIB))
    assert spec.process_cap(baseline_bytes=GIB, expert_bytes=10 * GIB) == int(4.7 * GIB)


def test_share_budget_converts_to_baseline_plus_share_of_expert_bytes():
    spec = parse_budget("33%")
    assert spec.kind == "share" and spec.share == pytest.approx(0.33)
    assert spec.process_cap(baseline_bytes=1000, expert_bytes=10_000) == 1000 + 3300
    assert parse_budget("100%").process_cap(1000, 10_000) == 11_000


def test_auto_budget_has_no_cap():
    spec = parse_budget("AUTO")
    assert spec.kind == "auto" and spec.process_cap(1000, 10_000) is None


@pytest.mark.parametrize("text", ["0%", "-5%", "101%", "abc%", "0", "0GiB", "-1GiB", "lots"])
def test_bad_budgets_raise_budget_error(text):
    with pytest.raises(BudgetError):
        parse_budget(text)


def test_bad_budget_message_lists_the_accepted_forms():
    with pytest.raises(BudgetError) as err:
        parse_budget("lots")
    assert "auto" in str(err.value) and "33%" in str(err.value) and "4.7GiB" in str(err.value)


def test_expert_capacity_is_what_the_baseline_leaves_and_never_negative():
    assert expert_capacity(5000, 1200, {}) == 3800
    assert expert_capacity(1000, 1200, {}) == 0


def _three_layers(cost: int) -> dict:
    return {LayerKey("decoder", i): cost for i in range(3)}


def test_check_fits_returns_capacity_when_one_expert_per_layer_fits():
    assert expert_capacity(1000 + 3 * 100, 1000, _three_layers(100), strict=True) == 300


def test_too_small_budget_error_states_the_numbers():
    with pytest.raises(BudgetError) as err:
        expert_capacity(1250, 1000, _three_layers(100), strict=True)
    msg = str(err.value)
    for number in ("1250", "1000", "1300", "300", "50"):  # budget, baseline, minimum, experts, shortfall
        assert f"{number} bytes" in msg
    assert "3 sparse layers" in msg


def test_format_size_is_human_readable():
    assert format_size(int(4.7 * GIB)) == "4.70 GiB"
    assert format_size(512) == "512 B"


class FakeMemory:
    """Another app taking and giving back memory, as the monitor sees it."""

    def __init__(self, available, rss):
        self.available, self.rss = available, rss

    def monitor(self, **kw):
        return MemoryMonitor(available_fn=lambda: self.available, rss_fn=lambda: self.rss, **kw)


def test_live_budget_is_min_of_cap_and_rss_plus_available_minus_reserve():
    mem = FakeMemory(available=3 * GIB, rss=GIB)
    assert mem.monitor(cap=10 * GIB, reserve=GIB).sample_once().budget == 3 * GIB
    assert mem.monitor(cap=2 * GIB, reserve=GIB).sample_once().budget == 2 * GIB
    assert mem.monitor(cap=None, reserve=GIB).sample_once().budget == 3 * GIB


def test_monitor_reports_first_sample_and_only_moves_beyond_threshold():
    mem = FakeMemory(available=4 * GIB, rss=GIB)
    seen = []
    mon = mem.monitor(cap=None, on_change=seen.append, threshold_bytes=10 * MIB)
    mon.sample_once()
    mem.available -= 5 * MIB  # noise: not reported
    mon.sample_once()
    mem.available -= 6 * MIB  # drift adds up past the threshold: reported
    mon.sample_once()
    assert seen == [5 * GIB, 5 * GIB - 11 * MIB]
    assert mon.current() == 5 * GIB - 11 * MIB


def test_monitor_shrinks_within_one_period_and_grows_back_up_to_the_cap():
    mem = FakeMemory(available=6 * GIB, rss=GIB)
    seen, changed = [], threading.Event()

    def on_change(budget):
        seen.append(budget)
        changed.set()

    period = 0.02
    mon = mem.monitor(cap=4 * GIB, reserve=0, period_s=period, on_change=on_change)
    with mon:
        assert seen == [4 * GIB]  # reported once at start, capped
        changed.clear()
        mem.available = GIB  # another app takes memory
        t0 = time.monotonic()
        assert changed.wait(2.0)
        assert time.monotonic() - t0 < period + 0.5  # loose: shared CI cores
        assert mon.current() == 2 * GIB
        changed.clear()
        mem.available = 8 * GIB  # it quits: grow back, but not past the cap
        assert changed.wait(2.0)
        assert mon.current() == 4 * GIB
    assert seen == [4 * GIB, 2 * GIB, 4 * GIB]


def test_monitor_stop_joins_promptly_even_with_a_long_period():
    mon = FakeMemory(GIB, GIB).monitor(cap=None, period_s=60.0)
    mon.start()
    t0 = time.monotonic()
    mon.stop()
    assert time.monotonic() - t0 < 1.0
    assert not any(t.name == "swapmoe-memory-monitor" and t.is_alive() for t in threading.enumerate())


def test_monitor_survives_a_failing_reading():
    mem = FakeMemory(GIB, GIB)
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("transient")
        return mem.available

    got = threading.Event()
    mon = MemoryMonitor(cap=None, period_s=0.01, available_fn=flaky, rss_fn=lambda: mem.rss,
                        on_change=lambda b: got.set() if b == 4 * GIB else None)
    with mon:
        mem.available = 3 * GIB
        assert got.wait(2.0)
