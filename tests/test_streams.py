"""Streams of documents: the grouped order, the fixed shuffle, section filters, and their errors."""

import json

import pytest

from swapmoe_edge.core.errors import InputError
from swapmoe_edge.lab.evaluate import read_pairs
from swapmoe_edge.lab.streams import order_documents, parse_sections, read_stream, select_sections

SECTIONS = ["net", "games", "net", "libs", "games", "net", "libs", "games"]


def _docs():
    return [{"id": f"d{i}", "section": s, "text": f"text {i}", "summary": f"s {i}"} for i, s in enumerate(SECTIONS)]


def test_grouped_puts_each_section_together_in_name_order_keeping_file_order_inside():
    out = order_documents(_docs(), "grouped")
    assert [d["section"] for d in out] == ["games"] * 3 + ["libs"] * 2 + ["net"] * 3
    assert [d["id"] for d in out] == ["d1", "d4", "d7", "d3", "d6", "d0", "d2", "d5"]


def test_orders_are_deterministic_and_shuffled_is_a_permutation():
    for order in ("file", "shuffled", "grouped"):
        assert order_documents(_docs(), order) == order_documents(_docs(), order)
    shuffled = order_documents(_docs(), "shuffled")
    assert sorted(d["id"] for d in shuffled) == sorted(d["id"] for d in _docs())
    assert [d["id"] for d in shuffled] != [d["id"] for d in _docs()]
    assert order_documents(_docs(), "file") == _docs()


def test_grouped_without_sections_says_how_to_get_them():
    docs = [{"text": "a", "summary": "b"}, {"text": "c", "summary": "d"}]
    with pytest.raises(InputError, match=r"document 1 has no string field `section`.*swapmoe data debian"):
        order_documents(docs, "grouped", where="old.jsonl")
    assert order_documents(docs, "shuffled")  # the other orders need no section


def test_unknown_order_is_refused():
    with pytest.raises(InputError, match="unknown order 'random'"):
        order_documents(_docs(), "random")


def test_select_and_exclude_sections():
    assert parse_sections("libs, net,,") == ("libs", "net")
    kept = select_sections(_docs(), ("libs", "net"), ("net",))
    assert [d["id"] for d in kept] == ["d3", "d6"]
    assert [d["id"] for d in select_sections(_docs(), (), ("games",))] == ["d0", "d2", "d3", "d5", "d6"]
    with pytest.raises(InputError, match="no document is left.*games, libs, net"):
        select_sections(_docs(), ("fonts",))


def test_read_pairs_filters_then_limits_then_orders(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    docs = read_pairs(path, limit=4, order="grouped", exclude_sections=("libs",))
    # first 4 of the non-libs documents (d0 d1 d2 d4), then grouped
    assert [d["id"] for d in docs] == ["d1", "d4", "d0", "d2"]


def test_read_stream_filters_then_limits_then_orders_plain_documents_too(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in d.items() if k != "summary"}) + "\n" for d in _docs()))
    docs = read_stream(path, limit=4, order="grouped", exclude_sections=("libs",))
    assert [d["id"] for d in docs] == ["d1", "d4", "d0", "d2"]
    lines = tmp_path / "docs.txt"
    lines.write_text("first\nsecond\nthird\n")
    assert [d["text"] for d in read_stream(lines, limit=2)] == ["first", "second"]
    assert [d["text"] for d in read_stream(lines)] == ["first", "second", "third"]
    with pytest.raises(InputError, match="limit must be at least 1"):
        read_stream(lines, limit=0)
