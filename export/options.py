"""What an export will write, settled from its options before anything is read: the dense weight
type, the experts' type, the ladder's rungs, and whether validation can run. Both drivers (the
Switch exporter and the decoder-only one) take their options through here, so that the same
option gets the same default and the same error for every model family."""

from __future__ import annotations

import importlib.util

from swapmoe_edge.core.errors import ExportError

from . import ladder, quant


def export_types(dtype: str, block_size: int | None, accuracy_level: int | None, lm_head: str | None,
                 expert_dtype: str | None, ladder_rungs: tuple[str, ...] | None, default_ladder: bool = True):
    """(dense weights, expert dtype, ladder rungs) for these options; ExportError naming a bad one.

    ``ladder_rungs`` None: int4 where ``default_ladder`` and the experts are float32 or float16.
    """
    try:
        dense = quant.dense_weights(dtype, block_size, accuracy_level, lm_head=lm_head)
    except ValueError as e:
        raise ExportError(str(e)) from None
    expert_dtype = expert_dtype or dtype
    if expert_dtype not in quant.EXPERT_DTYPES:
        raise ExportError(f"--expert-dtype must be one of {', '.join(quant.EXPERT_DTYPES)}, not {expert_dtype!r}")
    if ladder_rungs is None:
        ladder_rungs = ("int4",) if default_ladder and not ladder.rung_error("int4", expert_dtype) else ()
    for rung in ladder_rungs:
        why = ladder.rung_error(rung, expert_dtype)
        if why:
            raise ExportError(f"--ladder {rung}: {why}. Choose a lower rung or --ladder none.")
    return dense, expert_dtype, tuple(ladder_rungs)


def expert_level(level: int | None, expert_dtype: str) -> int:
    """The int4 experts' MatMulNBits accuracy level (None: quant.INT4_ACCURACY); ExportError for
    another type's experts or another level."""
    if level is None:
        return quant.INT4_ACCURACY
    if expert_dtype != "int4":
        raise ExportError(f"--expert-accuracy-level applies to int4 experts; these are {expert_dtype} "
                          "(add --expert-dtype int4, or leave the option out).")
    if level not in quant.ACCURACY_LEVELS:
        raise ExportError(f"--expert-accuracy-level must be one of {', '.join(map(str, quant.ACCURACY_LEVELS))}, not {level!r}")
    return level


def ladder_block(block: int | None, rungs: tuple[str, ...]) -> int:
    """The ladder copies' block size (None: ladder.BLOCK); ExportError for another size, or one given
    without rungs to apply it to."""
    if block is None:
        return ladder.BLOCK
    if not rungs:
        raise ExportError("--ladder-block applies to the ladder's copies, and this export writes none "
                          "(leave it out, or choose rungs with --ladder).")
    if block not in ladder.BLOCKS:
        raise ExportError(f"--ladder-block must be one of {', '.join(map(str, ladder.BLOCKS))}, not {block!r}")
    return block


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_validation_packages(validate: bool) -> None:
    """ExportError before any work when validation is asked for and torch or transformers is missing."""
    missing = [m for m in ("torch", "transformers") if validate and not importable(m)]
    if missing:
        raise ExportError(
            f"validation runs the PyTorch model and needs {' and '.join(missing)} (not installed). Install "
            "torch==2.13.0 then `pip install 'swapmoe-edge[export]'`, or export with --no-validate "
            "(the export itself needs neither)."
        )
