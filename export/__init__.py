"""swapmoe_export: split a Hugging Face Switch Transformer into a streamable ONNX artifact.

Export needs the core install (numpy, onnx, onnxruntime); validation against PyTorch and
``pytorch_model.bin`` checkpoints need the ``export`` extra (torch, transformers). The
runtime (``swapmoe_edge``) never imports this package; its CLI does.

Importing the package is cheap: ``export_checkpoint`` brings in the exporter (onnx, about
20 MB of a process) when first used, so a serving process that might export the embedded
model on first use pays for onnx only if it does.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
__all__ = ["export_checkpoint"]

if TYPE_CHECKING:
    from .exporter import export_checkpoint


def __getattr__(name: str):
    if name != "export_checkpoint":
        raise AttributeError(f"module 'swapmoe_export' has no attribute {name!r}")
    value = importlib.import_module(".exporter", __name__).export_checkpoint
    globals()[name] = value
    return value
