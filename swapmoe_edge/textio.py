"""Reading documents: one per line, or JSONL records with a ``text`` field."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError


def read_documents(path: str | Path) -> list[dict]:
    """Records with at least ``text`` (JSONL keeps every field, e.g. ``summary``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file.")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
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
