"""The Debian package-description summarisation corpus, built from apt's own index files.

Document = a package's long description, summary = its one-line synopsis. Both come from
the ``*_Translation-en`` files that ``apt-get update -o Acquire::Languages=en`` leaves in
``/var/lib/apt/lists/``; the text is built on the machine and never shipped.

Source rule (the split key): the ``Source:`` field of the package's stanza in the
``*_Packages`` files of the same lists directory (without its version), or the package
name itself when the stanza has no ``Source:``. A package absent from every Packages file
(another architecture, a stale list) gets the first hit among its *stripped* names, and
else the last stripped name. Stripping removes, repeatedly, one of the suffixes in
``STRIP_SUFFIXES`` and, for ``lib*`` names, a trailing soname version
(``libssl3`` -> ``libssl``, ``libfoo-2.0-0`` -> ``libfoo``). Over-grouping is harmless;
the point is that near-duplicate descriptions of one source land on one side of the split.

Section (the document's topic, for streams grouped by topic): the ``Section:`` field of the
same stanza, without its component prefix (``contrib/games`` -> ``games``: the component is
a licence, not a topic), found by the same rule as the source; ``unknown`` when no stanza
is found or it has no Section.

Stdlib only: apt may keep its lists lz4- or zstd-compressed (``Acquire::GzipIndexes``), and
those are read through ``apt-helper cat-file`` (or ``lz4cat``/``zstdcat``).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from swapmoe_edge.core.errors import InputError

APT_UPDATE_COMMAND = "apt-get update -o Acquire::Languages=en"
SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.90, 0.05, 0.05)
STRIP_SUFFIXES = ("-dev", "-doc", "-dbg", "-dbgsym", "-common", "-data", "-examples", "-tests")

_STDLIB_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".lzma": lzma.open, ".bz2": bz2.open}
_EXTERNAL = {".lz4": "lz4cat", ".zst": "zstdcat"}
_APT_HELPER = "/usr/lib/apt/apt-helper"
_BULLET = re.compile(r"^([*+o\u2022-]|\d{1,2}[.)])\s+(.*)$")
_SONAME = re.compile(r"^(lib.+?)[-.\d]*\d$")


@dataclass(frozen=True)
class Description:
    """One ``Description-en`` stanza, turned into plain text."""

    package: str
    md5: str
    synopsis: str
    text: str


# ---------------------------------------------------------------- reading apt's files


def list_files(lists_dir: Path, kind: str) -> list[Path]:
    """The ``*_<kind>`` index files in ``lists_dir`` (plain or compressed), sorted by name."""
    suffixes = ("", *_STDLIB_OPENERS, *_EXTERNAL)
    found = [p for p in Path(lists_dir).glob(f"*_{kind}*")
             if p.is_file() and p.name[p.name.rindex(f"_{kind}") + len(kind) + 1:] in suffixes]
    return sorted(found)


def read_lines(path: Path) -> Iterator[str]:
    """Lines of a plain or compressed apt list file, without line endings."""
    path = Path(path)
    suffix = path.suffix
    if suffix in _STDLIB_OPENERS:
        try:
            with _STDLIB_OPENERS[suffix](path, "rt", encoding="utf-8", errors="replace") as f:
                yield from (line.rstrip("\n") for line in f)
        except (OSError, EOFError, lzma.LZMAError) as e:  # BadGzipFile is an OSError
            raise InputError(f"{path} is not a readable {suffix}-compressed file ({e}); fetch the lists again.") from e
    elif suffix in _EXTERNAL:
        yield from _read_external(path, _EXTERNAL[suffix])
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from (line.rstrip("\n") for line in f)


def _read_external(path: Path, tool: str) -> Iterator[str]:
    # apt-helper decompresses every format apt itself can write; the *cat tools are a fallback.
    if os.access(_APT_HELPER, os.X_OK):
        cmd = [_APT_HELPER, "cat-file", str(path)]
    elif shutil.which(tool):
        cmd = [tool, str(path)]
    else:
        raise InputError(
            f"{path} is {path.suffix}-compressed and neither {_APT_HELPER} nor {tool} is available "
            f"to read it. Install {tool}, or decompress the file next to it."
        )
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        yield from (line.rstrip("\n") for line in io.TextIOWrapper(proc.stdout, "utf-8", "replace"))
    if proc.returncode != 0:
        raise InputError(f"{path}: `{' '.join(cmd)}` failed with exit status {proc.returncode}.")


def iter_stanzas(lines: Iterable[str], fields: frozenset[str] | None = None) -> Iterator[dict[str, str]]:
    """Deb822 stanzas as {field: value}; continuation lines are kept, joined with newlines.

    ``fields`` keeps only those fields (the Packages files are large).
    """
    stanza: dict[str, str] = {}
    current: str | None = None
    for line in lines:
        if not line.strip():
            if stanza:
                yield stanza
            stanza, current = {}, None
        elif line[0] in " \t":
            if current is not None:
                stanza[current] += "\n" + line
        elif ":" in line:
            name, value = line.split(":", 1)
            current = name if fields is None or name in fields else None
            if current is not None:
                stanza[current] = value.strip()
    if stanza:
        yield stanza


def parse_description(value: str) -> tuple[str, str]:
    """(synopsis, plain text) of a Description field value.

    Wrapped lines join into one line, " ." starts a new paragraph (a newline), and
    bullet items (``*``, ``-``, ``+``, ``o``, ``1.``) each get a line of their own,
    written ``- item``. Until the next paragraph break, a line indented at least as deep
    as the bullet continues the item (in real descriptions that is a wrapped item far more
    often than a new paragraph).
    """
    synopsis, _, long = value.partition("\n")
    out: list[str] = []        # output lines
    bullet_indent = None       # indent of the open bullet item, if the last line is one
    new_line = True            # the next plain text starts a new output line
    for raw in long.split("\n"):
        body = raw[1:] if raw[:1] in (" ", "\t") else raw
        if body.strip() == ".":
            new_line, bullet_indent = True, None
            continue
        indent = len(body) - len(body.lstrip())
        stripped = " ".join(body.split())
        if not stripped:
            continue
        m = _BULLET.match(stripped)
        if m and (m.group(1) != "o" or indent > 0):
            item = m.group(2) if not m.group(1)[0].isdigit() else stripped
            out.append(("- " if not m.group(1)[0].isdigit() else "") + item)
            bullet_indent, new_line = indent, False
        elif bullet_indent is not None and indent >= bullet_indent:
            out[-1] += " " + stripped
        elif new_line or bullet_indent is not None:
            out.append(stripped)
            bullet_indent, new_line = None, False
        else:
            out[-1] += " " + stripped
    return " ".join(synopsis.split()), "\n".join(out)


def read_translations(path: Path) -> Iterator[Description]:
    """Every package description in one ``*_Translation-en`` file."""
    keep = frozenset({"Package", "Description-md5", "Description-en"})
    for stanza in iter_stanzas(read_lines(path), keep):
        if "Package" in stanza and "Description-en" in stanza:
            synopsis, text = parse_description(stanza["Description-en"])
            yield Description(stanza["Package"], stanza.get("Description-md5", ""), synopsis, text)


UNKNOWN_SECTION = "unknown"


def read_package_map(paths: Iterable[Path]) -> dict[str, tuple[str, str]]:
    """{binary package: (source package, section)} from ``*_Packages`` files (first stanza wins)."""
    found: dict[str, tuple[str, str]] = {}
    keep = frozenset({"Package", "Source", "Section"})
    for path in paths:
        for stanza in iter_stanzas(read_lines(path), keep):
            if "Package" in stanza and stanza["Package"] not in found:
                source = stanza.get("Source", "").split(" ")[0] or stanza["Package"]
                section = stanza.get("Section", "").strip().rsplit("/", 1)[-1] or UNKNOWN_SECTION
                found[stanza["Package"]] = (source, section)
    return found


def read_source_map(paths: Iterable[Path]) -> dict[str, str]:
    """{binary package: source package} from ``*_Packages`` files."""
    return {pkg: source for pkg, (source, _) in read_package_map(paths).items()}


def section_of(package: str, package_map: dict[str, tuple[str, str]]) -> str:
    """The Debian section of ``package`` (same lookup rule as ``source_of``), or ``unknown``."""
    for name in (package, *stripped_names(package)):
        if name in package_map:
            return package_map[name][1]
    return UNKNOWN_SECTION


def stripped_names(package: str) -> list[str]:
    """The package name with common binary-package suffixes removed, one step at a time."""
    names, name = [], package
    while True:
        for suffix in STRIP_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
        else:
            m = _SONAME.match(name)
            if not m or m.group(1) == name:
                return names
            name = m.group(1)
        names.append(name)


def source_of(package: str, source_map: dict[str, str]) -> str:
    """The source-package key of ``package`` (see the module docstring for the rule)."""
    if package in source_map:
        return source_map[package]
    candidates = stripped_names(package)
    for name in candidates:
        if name in source_map:
            return source_map[name]
    return candidates[-1] if candidates else package


def split_of(source: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """The split a source package belongs to: a stable hash, identical on every machine."""
    u = int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest()[:8], "big") / 2.0**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


# ---------------------------------------------------------------- building the corpus


def build_debian_corpus(
    out_dir: str | Path,
    lists_dir: str | Path = "/var/lib/apt/lists",
    min_words: int = 8,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> dict:
    """Write train/validation/test.jsonl ({id, package, source, section, text, summary}) to ``out_dir``.

    Pairs with the same text and summary are kept once (first in file-name order);
    documents under ``min_words`` words and empty synopses are dropped. Returns counts.
    """
    assert abs(sum(fractions) - 1.0) < 1e-9 and len(fractions) == len(SPLITS)
    lists_dir, out_dir = Path(lists_dir), Path(out_dir)
    translations = list_files(lists_dir, "Translation-en")
    if not translations:
        raise InputError(
            f"no *_Translation-en files in {lists_dir}: apt has not fetched the English package "
            f"descriptions. Run `{APT_UPDATE_COMMAND}` (as root), then try again."
        )
    package_map = read_package_map(list_files(lists_dir, "Packages"))
    source_map = {pkg: source for pkg, (source, _) in package_map.items()}

    seen: set[str] = set()
    rows: dict[str, list[dict]] = {name: [] for name in SPLITS}
    counts = {"descriptions": 0, "duplicates": 0, "too_short": 0}
    for path in translations:
        for d in read_translations(path):
            counts["descriptions"] += 1
            if not d.synopsis or len(d.text.split()) < min_words:
                counts["too_short"] += 1
                continue
            key = hashlib.sha1(f"{d.synopsis}\n{d.text}".encode("utf-8")).hexdigest()[:16]
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            source = source_of(d.package, source_map)
            rows[split_of(source, fractions)].append(
                {"id": key, "package": d.package, "source": source, "section": section_of(d.package, package_map),
                 "text": d.text, "summary": d.synopsis}
            )

    if counts["descriptions"] == 0:
        raise InputError(
            f"no package description found in {', '.join(str(p) for p in translations)}: they are not apt "
            f"Translation-en files (binary or damaged?). Run `{APT_UPDATE_COMMAND}` (as root), then try again."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        rows[name].sort(key=lambda r: r["id"])
        _write_atomic(out_dir / f"{name}.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[name]))
        counts[name] = len(rows[name])
    all_rows = [r for name in SPLITS for r in rows[name]]
    counts["pairs"] = len(all_rows)
    counts["sources"] = len({r["source"] for r in all_rows})
    if all_rows:
        counts["median_text_words"] = statistics.median(len(r["text"].split()) for r in all_rows)
        counts["median_summary_words"] = statistics.median(len(r["summary"].split()) for r in all_rows)
    meta = {"counts": counts, "inputs": [p.name for p in translations], "min_words": min_words,
            "fractions": list(fractions)}
    _write_atomic(out_dir / "corpus.json", json.dumps(meta, indent=2) + "\n")
    return counts


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
