"""An artifact's importance profile over calibration texts (SwapMoE Eq. 1), and the measures
that the planners split a budget by: per-layer loss curves, each low-bit rung's cost, and the
decoder predictor. ``swapmoe profile`` is a shell over ``calibrate``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Collection, Sequence

from swapmoe_edge.core.errors import InputError
from swapmoe_edge.lab.streams import read_stream
from swapmoe_edge.lab.substitution import LOSS_NOTE, RUNG_LOSS_NOTE, measure_loss, measure_rung_loss
from swapmoe_edge.model.rungs import rung_runners
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.residency.predictor import PREDICTOR_NOTE, fit, per_document_importance
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig


def calibration_texts(data: str | Path, limit: int | None = None, sections: Sequence[str] = (),
                      exclude_sections: Sequence[str] = ()) -> list[str]:
    """The first ``limit`` texts of DATA (lines, or JSONL with `text`) in the chosen sections."""
    return [d["text"] for d in read_stream(data, limit, sections=sections, exclude_sections=exclude_sections)]


#: What `swapmoe profile --add` measures onto a profile that has its importance already.
PARTS = ("loss", "rung-loss", "predictor")


def calibrate(artifact: str | Path, data: str | Path, *, limit: int | None = None, sections: Sequence[str] = (),
              exclude_sections: Sequence[str] = (), budget: str = "auto", device: str | None = None,
              max_new_tokens: int = 32, with_loss: bool = False, with_predictor: bool = False,
              threads: int | None = None, onto: Profile | None = None, parts: Collection[str] = ()) -> Profile:
    """The importance profile of ARTIFACT (run exact, on-demand, at ``budget``) over DATA's texts.

    ``with_loss``: also each layer's loss curve and best substitute (teacher-forced KL against
    the full model's summaries) and, with a ladder on the host, each rung's loss.
    ``with_predictor``: also the decoder predictor (one more pass, a text at a time).
    ``threads``: ONNX Runtime threads (None: the device profile's).
    ``onto``: a profile of ARTIFACT to measure only ``parts`` (of PARTS) onto, keeping its
    importance and whatever else it holds (no importance pass): the rung losses of a rung added
    later, say. The profile's meta lists what was added, over how many texts.
    """
    if onto is None:
        parts = {*(("loss", "rung-loss") if with_loss else ()), *(("predictor",) if with_predictor else ())}
    elif not parts or set(parts) - set(PARTS):
        raise InputError(f"choose what to add to the profile: one or more of {', '.join(PARTS)}, not {sorted(parts)}.")
    texts = calibration_texts(data, limit, sections, exclude_sections)
    with Runtime(artifact, RuntimeConfig(policy="on-demand", budget=budget, device=device, threads=threads)) as rt:
        if "predictor" in parts and not any(lk.stack == "encoder" for lk in rt.sparse):
            raise InputError(f"{artifact}: a {rt.family.kind} model has no encoder routing to predict its decoder's "
                             "experts from; profile it without --predict-decoder.")
        ladder = bool(rt.manifest.ladder) and rt.placement == "host"
        if onto is not None and "rung-loss" in parts and not ladder:
            raise InputError(f"{artifact} has no ladder on the host to measure rung losses of; add rungs first "
                             "(`swapmoe ladder add`), or leave rung-loss out.")
        if onto is None:
            prof = rt.profile_texts(texts, max_new_tokens=max_new_tokens)
            if rt.family.top_k > 1:  # Eq. 1 summed over each token's k choices
                prof = replace(prof, meta={**prof.meta, "top_k": rt.family.top_k})
        else:
            onto.check_layers({lk: rt.manifest.config.num_experts for lk in rt.sparse}, where="the profile to add to")
            prof = onto
        if "loss" in parts:
            loss, substitute = measure_loss(rt, texts, prof.importance, max_new_tokens=max_new_tokens)
            prof = replace(prof, loss=loss, substitute=substitute, meta={**prof.meta, "loss": LOSS_NOTE})
        if "rung-loss" in parts and ladder:  # what each low-bit rung costs: the ladder's qualities
            runners = rung_runners(rt.manifest, replace(rt.config, ladder_rungs="auto"), rt.sessions,
                                   rt.threads, list(rt.providers), rt.placement)
            rung_loss = measure_rung_loss(rt, texts, runners, max_new_tokens=max_new_tokens)
            prof = replace(prof, rung_loss=rung_loss, meta={**prof.meta, "rung_loss": RUNG_LOSS_NOTE})
        if "predictor" in parts:
            seen = per_document_importance(rt, texts, max_new_tokens)
            prof = replace(prof, predictor=fit(seen), meta={**prof.meta, "predictor": PREDICTOR_NOTE})
    chosen = {"sections": list(sections), "exclude_sections": list(exclude_sections)} if sections or exclude_sections else {}
    if onto is not None:
        added = {"parts": sorted(parts), "texts": len(texts), **chosen}
        return replace(prof, meta={**prof.meta, "added": [*prof.meta.get("added", []), added]})
    return replace(prof, meta={**prof.meta, **chosen})
