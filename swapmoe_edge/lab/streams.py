"""Streams of documents: which documents a run serves, and in what order.

A user's stream has topics: documents about one subject arrive together, and the experts
that matter move with them. The Debian corpus records each document's ``section`` (its
package's Debian Section: ``libs``, ``python``, ``games`` ...), which stands for a topic.

- ``file``: the documents in the order of the file (the corpus files are sorted by a hash
  of the text, so that order is already a shuffle).
- ``shuffled``: a fixed pseudo-random permutation (seed 0): the same on every machine.
- ``grouped``: every document of one section together, sections in name order, and the
  file's order inside a section.

``select_sections`` keeps (or drops) the documents of chosen sections, e.g. to calibrate a
profile on some sections and serve others. Both are pure functions of the records.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Sequence

from swapmoe_edge.core.errors import InputError
from swapmoe_edge.core.textio import read_documents

ORDERS = ("file", "shuffled", "grouped")
SHUFFLE_SEED = 0


def parse_sections(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"libs,python"`` (or an iterable of such strings) -> ``("libs", "python")``."""
    if value is None:
        return ()
    parts = [value] if isinstance(value, str) else list(value)
    return tuple(s.strip() for part in parts for s in part.split(",") if s.strip())


def _check_sections(docs: Sequence[dict], where: str, why: str) -> None:
    for i, rec in enumerate(docs):
        if not isinstance(rec.get("section"), str):
            raise InputError(
                f"{where}: document {i + 1} has no string field `section`, which {why} needs. Rebuild the "
                "corpus with `swapmoe data debian` (it reads each package's Section from apt's Packages "
                "files), or add a `section` field to every record."
            )


def select_sections(docs: Sequence[dict], sections: Iterable[str] = (), exclude: Iterable[str] = (),
                    where: str = "the data") -> list[dict]:
    """The documents whose section is in ``sections`` (all when empty) and not in ``exclude``."""
    keep, drop = set(sections), set(exclude)
    if not keep and not drop:
        return list(docs)
    _check_sections(docs, where, "choosing documents by section")
    out = [d for d in docs if (not keep or d["section"] in keep) and d["section"] not in drop]
    if not out:
        have = sorted({d["section"] for d in docs})
        raise InputError(f"{where}: no document is left after choosing sections {sorted(keep) or 'all'} "
                         f"minus {sorted(drop) or 'none'}; its sections are {', '.join(have)}.")
    return out


def order_documents(docs: Sequence[dict], order: str = "file", where: str = "the data") -> list[dict]:
    """The documents in the stream order ``order`` (see the module docstring)."""
    if order not in ORDERS:
        raise InputError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    docs = list(docs)
    if order == "shuffled":
        random.Random(SHUFFLE_SEED).shuffle(docs)
    elif order == "grouped":
        _check_sections(docs, where, "--order grouped")
        docs.sort(key=lambda d: d["section"])  # stable: the file's order inside a section
    return docs


def read_stream(path: str | Path, limit: int | None = None, order: str = "file", sections: Iterable[str] = (),
                exclude_sections: Iterable[str] = ()) -> list[dict]:
    """The documents of PATH (lines, or JSONL with `text`) of the chosen sections (all by default),
    the first ``limit`` of them, in stream ``order``."""
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, not {limit}")
    docs = select_sections(read_documents(path), sections, exclude_sections, where=str(path))
    return order_documents(docs[:limit], order, where=str(path))
