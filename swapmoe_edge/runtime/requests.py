"""A request's way in: texts to token ids, checks, the activation envelope's chunks, and the
checkpoint's generation settings; and what runs around a request's token loop."""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from swapmoe_edge.core.errors import InputError

# Generation settings that change HF's output and that generate.py does not implement, with
# the values at which they do nothing.
_UNSUPPORTED_GENERATION = {"repetition_penalty": 1.0, "min_length": 0, "min_new_tokens": None,
                           "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "forced_bos_token_id": None,
                           "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                           "do_sample": False}


def generation_settings(generation: dict[str, Any]) -> int:
    """The checkpoint's ``no_repeat_ngram_size``; warns about settings this runtime ignores, and
    refuses a beam width no request could use (at load, not at the first request)."""
    ignored = {k: generation[k] for k, neutral in _UNSUPPORTED_GENERATION.items()
               if generation.get(k) not in (None, neutral, [])}
    if ignored:
        warnings.warn(f"the checkpoint's generation config sets {ignored}, which this runtime does not apply: "
                      "its outputs will differ from Hugging Face generate (greedy/beam search and "
                      "no_repeat_ngram_size are supported)", stacklevel=4)
    n = generation.get("no_repeat_ngram_size") or 0
    if not isinstance(n, int) or n < 0:
        raise InputError(f"generation config: no_repeat_ngram_size must be a non-negative integer, not {n!r}")
    generation_beams(generation)
    return n


def generation_beams(generation: dict[str, Any]) -> int:
    """The checkpoint's beam width (``num_beams``, 1 where it sets none): a request's default."""
    n = generation.get("num_beams")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"generation config: num_beams must be a positive integer, not {n!r}")
    return n


def encode_texts(tokenizer, texts: Sequence[str], max_source_tokens: int, root: Path,
                 keep_end: bool = False) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each text, as the tokenizer makes them, and which were cut to ``max_source_tokens``:
    an encoder input keeps its head and its closing </s>; with ``keep_end`` (a decoder-only
    prompt, continued from its end) the text keeps its last tokens."""
    _check_tokenizer(tokenizer, root)
    ids, truncated = [], []
    for i, text in enumerate(texts):
        _check_text(text, i)
        row = tokenizer.encode(text).ids
        cut = len(row) > max_source_tokens
        if cut:
            warnings.warn(f"input {i + 1} has {len(row)} tokens; truncated to the model's limit of "
                          f"{max_source_tokens}" + (" (its last tokens kept)" if keep_end else ""), stacklevel=4)
            # keep_end: the prompt's end, which generation continues; else the closing </s>
            row = row[-max_source_tokens:] if keep_end else row[: max_source_tokens - 1] + row[-1:]
        ids.append(row)
        truncated.append(cut)
    return ids, truncated


def encode_prompts(tokenizer, documents: Sequence[str], template: str, max_source_tokens: int,
                   root: Path) -> tuple[list[list[int]], list[bool]]:
    """A decoder-only summariser's prompts: each document put into ``template`` (at its
    "{document}") and the whole text tokenised, and which documents were cut.

    A document is cut so that the prompt fits in ``max_source_tokens``: after the token that
    leaves room for the template's own tokens, at that token's end in the original text (the
    same cut a training script makes with the tokenizer's offsets).
    """
    _check_tokenizer(tokenizer, root)
    if not isinstance(template, str) or "{document}" not in template:
        raise InputError(f"artifact {root}: its prompt template must be a string holding '{{document}}', not {template!r}")
    overhead = len(tokenizer.encode(template.replace("{document}", "x")).ids) - len(tokenizer.encode("x").ids)
    if max_source_tokens - overhead < 1:
        raise InputError(f"max_source_tokens ({max_source_tokens}) leaves no room for a document beside the prompt "
                         f"template's {overhead} tokens; raise max_source_tokens.")
    ids, truncated = [], []
    for i, text in enumerate(documents):
        _check_text(text, i)
        enc = tokenizer.encode(text)
        room, cut = max_source_tokens - overhead, False
        while True:
            if len(enc.ids) > room:
                text, cut = text[: enc.offsets[room - 1][1]], True
            row = tokenizer.encode(template.replace("{document}", text)).ids
            if len(row) <= max_source_tokens or room == 1:
                break
            room -= 1  # the cut merged differently with the template: one token less
        if cut:
            warnings.warn(f"input {i + 1} has {len(enc.ids)} tokens; truncated to {room} to fit the prompt template in "
                          f"the model's limit of {max_source_tokens}", stacklevel=4)
        ids.append(row)
        truncated.append(cut)
    return ids, truncated


def _check_tokenizer(tokenizer, root: Path) -> None:
    if tokenizer is None:
        raise InputError(f"artifact {root} has no tokenizer.json; pass token ids instead of text.")


def _check_text(text, i: int) -> None:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"input {i + 1} is empty; give some text.")


def check_request(input_ids: Sequence[Sequence[int]], max_new_tokens: int, num_beams: int,
                  forced_ids: Sequence[Sequence[int]] | None, limit: int) -> None:
    """InputError for a request the runtime will not run (``limit``: max_source_tokens)."""
    if forced_ids is not None:
        if num_beams != 1 or len(forced_ids) != len(input_ids):
            raise InputError("forced_ids needs num_beams=1 and one row per input")
        if any(len(f) < max_new_tokens for f in forced_ids):
            raise InputError(f"every forced_ids row needs at least max_new_tokens ({max_new_tokens}) tokens")
    if not input_ids or any(len(r) == 0 for r in input_ids):
        raise InputError("every input needs at least one token")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if num_beams < 1:
        raise InputError(f"num_beams must be at least 1, not {num_beams}")
    longest = max(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    if len(input_ids[longest]) > limit:
        raise InputError(f"input {longest + 1} has {len(input_ids[longest])} tokens, more than max_source_tokens "
                         f"({limit}); truncate it or raise max_source_tokens (the budget's baseline grows with it).")
    if num_beams > limit:
        raise InputError(f"num_beams {num_beams} exceeds max_source_tokens ({limit}), the activation envelope")


def chunks(rows: Sequence[Sequence[int]], max_cells: int) -> list[Sequence[Sequence[int]]]:
    """Consecutive groups of rows whose (count x longest length) stays within ``max_cells``."""
    out, start, width = [], 0, 0
    for i, row in enumerate(rows):
        width = max(width, len(row))
        if i > start and (i - start + 1) * width > max_cells:
            out.append(rows[start:i])
            start, width = i, len(row)
    out.append(rows[start:])
    return out


@contextmanager
def background_io_closed(gate: threading.Event) -> Iterator[Callable[[], None]]:
    """Background expert reads wait while a request runs up to its first token (the policy's
    ``background_io``); yields the call that opens them again, which the block's end makes too."""
    gate.clear()
    try:
        yield gate.set
    finally:
        gate.set()  # never left closed by a failed request


class Once:
    """Calls ``fn`` the first time it is called, never again."""

    def __init__(self, fn: Callable[[], None]):
        self._fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()
