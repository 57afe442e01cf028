"""The Debian description corpus: parsing apt's files, dedup, and a stable per-source split.

Every text here is written for the test; no real package description is committed.
"""

import gzip
import json
import shutil
import subprocess

import pytest

from swapmoe_edge.lab.corpus import (
    APT_UPDATE_COMMAND,
    SPLITS,
    build_debian_corpus,
    parse_description,
    section_of,
    read_package_map,
    read_source_map,
    read_translations,
    source_of,
    split_of,
)
from swapmoe_edge.core.errors import InputError

TRANSLATION = """\
Package: frobnicate
Description-md5: 0123456789abcdef0123456789abcdef
Description-en: tool that frobnicates widgets quickly
 Frobnicate reads widgets from standard input and
 frobnicates them in place.
 .
 It supports:
  * fast mode, which skips
    the slow checks;
  - safe mode
 .
 This package contains the command-line tool.

Package: libfrob-dev
Description-md5: 11111111111111111111111111111111
Description-en: widget frobnication library (development files)
 The frob library offers widget frobnication to other programs through a
 small and stable C interface.
 .
 This package contains the headers and the static library.

Package: tiny
Description-md5: 22222222222222222222222222222222
Description-en: a package with almost no description
 Too short.

"""

PACKAGES = """\
Package: frobnicate
Source: frob (1.2-3)
Version: 1.2-3+b1
Section: contrib/utils
Description: tool that frobnicates widgets quickly

Package: libfrob1
Source: frob
Version: 1.2-3
Section: libs
"""


def _long_description(i: int) -> str:
    return (f" Package number {i} is written only for this test; it has enough words\n"
            f" to pass the minimum length filter of the corpus builder.\n")


def _write_lists(lists_dir, translation=TRANSLATION, packages=PACKAGES):
    lists_dir.mkdir(parents=True, exist_ok=True)
    (lists_dir / "example.org_debian_dists_stable_main_i18n_Translation-en").write_text(translation)
    (lists_dir / "example.org_debian_dists_stable_main_binary-amd64_Packages").write_text(packages)
    return lists_dir


def _read_split(out_dir, name):
    return [json.loads(line) for line in (out_dir / f"{name}.jsonl").read_text().splitlines()]


def test_description_synopsis_paragraphs_and_wrapped_lines():
    value = TRANSLATION.split("Description-en: ", 1)[1].split("\n\n", 1)[0]
    synopsis, text = parse_description(value)
    assert synopsis == "tool that frobnicates widgets quickly"
    assert text.split("\n") == [
        "Frobnicate reads widgets from standard input and frobnicates them in place.",
        "It supports:",
        "- fast mode, which skips the slow checks;",
        "- safe mode",
        "This package contains the command-line tool.",
    ]


def test_bullet_continuation_at_the_bullet_indent_and_numbered_items():
    value = ("synopsis\n Intro line\n - first item wraps\n onto this line\n - second\n .\n"
             " 1. step one\n 2. step two")
    assert parse_description(value)[1].split("\n") == [
        "Intro line", "- first item wraps onto this line", "- second", "1. step one", "2. step two"]


def test_a_description_without_long_part_gives_empty_text():
    assert parse_description("just a synopsis ") == ("just a synopsis", "")


def test_read_translations_plain_and_gzip_agree(tmp_path):
    plain = tmp_path / "x_Translation-en"
    plain.write_text(TRANSLATION)
    with gzip.open(tmp_path / "y_Translation-en.gz", "wt") as f:
        f.write(TRANSLATION)
    a = list(read_translations(plain))
    b = list(read_translations(tmp_path / "y_Translation-en.gz"))
    assert a == b
    assert [d.package for d in a] == ["frobnicate", "libfrob-dev", "tiny"]
    assert a[0].md5 == "0123456789abcdef0123456789abcdef"


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs the lz4 tool")
def test_read_translations_lz4_as_apt_keeps_them(tmp_path):
    plain = tmp_path / "x_Translation-en"
    plain.write_text(TRANSLATION)
    subprocess.run(["lz4", "-q", str(plain), str(tmp_path / "z_Translation-en.lz4")], check=True)
    assert list(read_translations(tmp_path / "z_Translation-en.lz4")) == list(read_translations(plain))


def test_source_from_packages_field_then_from_stripped_name(tmp_path):
    lists = _write_lists(tmp_path / "lists")
    source_map = read_source_map(sorted(lists.glob("*_Packages")))
    assert source_of("frobnicate", source_map) == "frob"          # Source: with a version
    assert source_of("libfrob1", source_map) == "frob"
    assert source_of("libfrob1-dbg", source_map) == "frob"        # stripped name is known
    assert source_of("libfrob-dev", source_map) == "libfrob"      # unknown: stripped name
    assert source_of("libwidget-2.0-0", {}) == "libwidget"
    assert source_of("widget-common-doc", {}) == "widget"
    assert source_of("python3-widget", {}) == "python3-widget"


def test_split_is_a_stable_hash_of_the_source_name():
    # Pinned values: the split must not change across machines or Python versions.
    assert [split_of(s) for s in ("src0", "src22", "src11")] == ["train", "validation", "test"]


def test_build_writes_records_and_drops_duplicates_and_short_texts(tmp_path):
    lists = _write_lists(tmp_path / "lists")
    # The same descriptions again in a second list (e.g. the security archive): kept once.
    (lists / "security.example.org_dists_stable_main_i18n_Translation-en").write_text(TRANSLATION)
    counts = build_debian_corpus(tmp_path / "out", lists, min_words=5)
    rows = [r for name in SPLITS for r in _read_split(tmp_path / "out", name)]
    assert counts["descriptions"] == 6
    assert counts["duplicates"] == 2 and counts["too_short"] == 2
    assert counts["pairs"] == len(rows) == 2
    by_package = {r["package"]: r for r in rows}
    assert set(by_package) == {"frobnicate", "libfrob-dev"}
    r = by_package["frobnicate"]
    assert set(r) == {"id", "package", "source", "section", "text", "summary"}
    assert r["source"] == "frob" and r["summary"] == "tool that frobnicates widgets quickly"
    assert r["section"] == "utils"  # the component prefix (contrib/) is a licence, not a topic
    assert by_package["libfrob-dev"]["section"] == "unknown"  # in no Packages file, nor its stripped names
    assert r["text"].startswith("Frobnicate reads widgets")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "corpus.json", "test.jsonl", "train.jsonl", "validation.jsonl"]


def test_same_input_gives_byte_identical_files(tmp_path):
    stanzas = "".join(
        f"Package: pkg{i}\nDescription-md5: {i:032x}\nDescription-en: summary {i}\n{_long_description(i)}\n"
        for i in range(60))
    lists = _write_lists(tmp_path / "lists", translation=stanzas, packages="")
    build_debian_corpus(tmp_path / "a", lists)
    build_debian_corpus(tmp_path / "b", lists)
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "corpus.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_every_source_lands_in_one_split_only(tmp_path):
    # 40 sources with three binary packages each: the -doc one is missing from Packages.
    translation, packages = [], []
    for s in range(40):
        for j, name in enumerate((f"tool{s}", f"libtool{s}-1", f"tool{s}-doc")):
            i = 3 * s + j
            translation.append(f"Package: {name}\nDescription-md5: {i:032x}\n"
                               f"Description-en: summary {i}\n{_long_description(i)}\n")
        packages.append(f"Package: tool{s}\n\nPackage: libtool{s}-1\nSource: tool{s}\n\n")
    lists = _write_lists(tmp_path / "lists", "".join(translation), "".join(packages))
    counts = build_debian_corpus(tmp_path / "out", lists, fractions=(0.5, 0.25, 0.25))
    sides: dict[str, set[str]] = {}
    for name in SPLITS:
        for r in _read_split(tmp_path / "out", name):
            sides.setdefault(r["source"], set()).add(name)
            assert split_of(r["source"], (0.5, 0.25, 0.25)) == name
    assert sorted(sides) == sorted(f"tool{s}" for s in range(40))
    assert all(len(s) == 1 for s in sides.values())
    assert all(counts[name] > 0 for name in SPLITS)
    assert counts["pairs"] == 120


@pytest.mark.parametrize("make_dir", [True, False])
def test_no_translation_files_raises_with_the_apt_command(tmp_path, make_dir):
    lists = tmp_path / "lists"
    if make_dir:
        _write_lists(lists).joinpath("example.org_debian_dists_stable_main_i18n_Translation-en").unlink()
    with pytest.raises(InputError) as info:
        build_debian_corpus(tmp_path / "out", lists)
    assert APT_UPDATE_COMMAND in str(info.value)
    assert str(lists) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_section_from_packages_then_stripped_name_else_unknown(tmp_path):
    lists = _write_lists(tmp_path / "lists")
    found = read_package_map([next(lists.glob("*_Packages"))])
    assert found["frobnicate"] == ("frob", "utils") and found["libfrob1"] == ("frob", "libs")
    assert section_of("libfrob1-dbgsym", found) == "libs"  # not listed: its stripped name is
    assert section_of("nowhere", found) == "unknown"


def test_sections_are_the_same_on_every_build(tmp_path):
    stanzas = "".join(
        f"Package: pkg{i}\nDescription-md5: {i:032x}\nDescription-en: summary {i}\n{_long_description(i)}\n"
        for i in range(30))
    packages = "".join(f"Package: pkg{i}\nSection: {('games', 'net', 'non-free/sound')[i % 3]}\n\n" for i in range(30))
    lists = _write_lists(tmp_path / "lists", translation=stanzas, packages=packages)
    build_debian_corpus(tmp_path / "a", lists)
    build_debian_corpus(tmp_path / "b", lists)
    rows = [r for name in SPLITS for r in _read_split(tmp_path / "a", name)]
    assert {r["section"] for r in rows} == {"games", "net", "sound"}
    for r in rows:
        assert r["section"] == ("games", "net", "sound")[int(r["package"][3:]) % 3]
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
