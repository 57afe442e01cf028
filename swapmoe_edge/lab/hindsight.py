"""What choosing residents better could still buy a masked policy, measured on the model.

A trace replay (replay.py) bounds hit rates; this bounds output quality. Two runs of the
swapmoe runtime with its swapper off, residents set here between requests:

- ``hindsight``: before each request every sparse layer holds the ``k`` experts that carry
  the most of *that request's own* Eq. 1 importance, measured by running ``full`` on the
  same request first (a one-expert layer keeps its measured substitute, as swapmoe does).
  ``k`` is swapmoe's split of the budget. No online policy knows a request's routing before
  it runs, so a swapmoe-style policy (masked routing, the same counts, residents ranked by
  importance) cannot choose better than this request by request.
- ``static``: swapmoe's start set, never changed.

Requests are the runtime's own (``generate`` runs a batch in chunks that fit its activation
envelope: on the embedded model mostly one document each), so the hindsight sets change as
often as swapmoe could change its sets between requests. Cost: an eval run, twice for
``hindsight``.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

from swapmoe_edge.core.errors import InputError
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.runtime.config import RuntimeConfig
from swapmoe_edge.runtime.facade import Runtime
from swapmoe_edge.runtime.requests import chunks

MODES = ("hindsight", "static")


def bound_summaries(artifact: str | Path, texts: Sequence[str], budget: str, mode: str = "hindsight", *,
                    batch_size: int = 8, max_new_tokens: int = 32, threads: int | None = 1,
                    profile: Profile | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Greedy summaries of ``texts`` under ``mode`` (MODES) at ``budget``, batched as eval batches.

    Returns ``{"summaries", "requests", "counts" (experts per layer), "reads"}`` (``reads``: experts
    read to set the hindsight residents).
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not texts:
        raise InputError("a bound needs at least one document")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    cfg = RuntimeConfig(policy="swapmoe", budget=budget, threads=threads)
    full_rt = Runtime(artifact, RuntimeConfig(policy="full", threads=threads), profile=profile) \
        if mode == "hindsight" else nullcontext()
    summaries: list[str] = []
    requests = reads = 0
    with Runtime(artifact, cfg, profile=profile) as rt, full_rt as full:
        rt.wait_ready()
        engine = rt.policy
        engine.stop()  # the swapper off: residents change only below
        for i in range(0, len(texts), batch_size):
            batch = list(texts[i: i + batch_size])
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"input \d+ has \d+ tokens; truncated")
                ids, _ = rt.encode_texts(batch)
                start = 0
                for chunk in chunks(ids, rt.config.max_source_tokens):  # the runtime's requests
                    if full is not None:
                        seen = full.profile_texts(batch[start: start + len(chunk)], max_new_tokens,
                                                  batch_size=len(chunk)).importance
                        reads += engine.hold_best(seen)  # ranked as swapmoe ranks (substitutes pinned)
                    for r in rt.generate(chunk, max_new_tokens=max_new_tokens):
                        summaries.append(rt.tokenizer.decode(r.token_ids, skip_special_tokens=True).strip())
                    start += len(chunk)
                    requests += 1
            if progress is not None:
                progress(len(summaries), len(texts))
        counts = {lk.name: n for lk, n in engine.limits.counts.items()}
    return {"summaries": summaries, "requests": requests, "counts": counts, "reads": reads}
