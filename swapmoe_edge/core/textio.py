"""Reading documents: one per line, or JSONL records with a ``text`` field."""

from __future__ import annotations

import json
from pathlib import Path

from swapmoe_edge.core.errors import InputError


def read_text_file(path: str | Path) -> str:
    """The file as UTF-8 text (a BOM is dropped), or InputError naming the file, line and column
    of the first byte that is not UTF-8 text (binary files included)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path} cannot be read ({e.strerror or e}).") from e

    def where(pos: int) -> str:
        line = data.count(b"\n", 0, pos) + 1
        column = pos - data.rfind(b"\n", 0, pos)  # 1-based; rfind is -1 on the first line
        return f"{path}:{line} (column {column})"

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{where(e.start)} is not UTF-8 text (byte 0x{data[e.start]:02x}). Give a UTF-8 text file; "
            f"convert another encoding first, e.g. `iconv -f LATIN1 -t UTF-8 {path} > {path}.utf8`."
        ) from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise InputError(f"{where(nul)} holds a NUL byte: this looks like a binary file, not text.")
    return text


def read_documents(path: str | Path) -> list[dict]:
    """Records with at least ``text`` (JSONL keeps every field, e.g. ``summary``)."""
    path = Path(path)
    lines = [ln for ln in read_text_file(path).splitlines() if ln.strip()]
    if not lines:
        raise InputError(f"{path} holds no documents.")
    if not lines[0].lstrip().startswith("{"):
        return [{"text": ln} for ln in lines]
    docs = []
    for n, ln in enumerate(lines, 1):
        try:
            rec = json.loads(ln)
        except ValueError as e:
            raise InputError(f"{path}:{n} is not valid JSON ({e}).") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise InputError(f"{path}:{n} has no string field `text`.")
        docs.append(rec)
    return docs
