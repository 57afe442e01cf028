"""The paired standard error that every policy comparison quotes."""

import math

import pytest

pytest.importorskip("rouge_score")

from swapmoe_edge.lab.evaluate import paired_se, scorer  # noqa: E402


def test_identical_outputs_have_no_spread():
    refs = ["the quick brown fox", "a lazy dog sleeps", "tools for the shell"]
    outs = ["quick brown fox", "dog sleeps", "tools for shell"]
    assert paired_se(refs, outs, outs) == 0.0


def test_it_is_the_standard_error_of_the_per_document_differences():
    refs = ["the quick brown fox", "a lazy dog sleeps here", "tools for the shell"]
    a = ["quick fox", "a lazy dog", "tools for the shell"]
    b = ["the quick brown fox", "lazy cat", "tools for the shell"]
    r2 = lambda ref, s: scorer().score(ref, s)["rouge2"].fmeasure  # noqa: E731
    d = [r2(t, y) - r2(t, x) for t, x, y in zip(refs, a, b)]
    assert d[2] == 0.0 and d[0] > 0 > d[1]  # the case is not degenerate
    mean = sum(d) / 3
    expected = math.sqrt(sum((x - mean) ** 2 for x in d) / 2 / 3)
    assert paired_se(refs, a, b) == pytest.approx(expected)
