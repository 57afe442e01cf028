"""Typed errors: each says what is wrong, where, and what to do about it."""


class SwapMoEError(Exception):
    """Base class for every error this project raises on purpose."""


class ArtifactError(SwapMoEError):
    """An artifact directory is missing, incomplete, corrupt or of an unknown schema."""


class CheckpointError(SwapMoEError):
    """A Hugging Face checkpoint cannot be read or is not a Switch Transformer."""


class ExportError(SwapMoEError):
    """Export could not write a complete artifact."""


class ValidationError(SwapMoEError):
    """The split ONNX model does not reproduce the PyTorch model.

    ``mismatches`` lists every comparison that failed, not only the first.
    """

    def __init__(self, mismatches: list[str]):
        self.mismatches = list(mismatches)
        lines = "\n  ".join(self.mismatches)
        super().__init__(
            f"export validation failed: {len(self.mismatches)} mismatch(es) between ONNX Runtime "
            f"and PyTorch:\n  {lines}\nThe artifact was not written. Re-run with --no-validate "
            "only if you accept an unverified artifact."
        )


class BudgetError(SwapMoEError):
    """A memory budget is malformed or too small for the model."""


class InputError(SwapMoEError):
    """A user input (text, file, option) cannot be used."""
