"""swapmoe_export: split a Hugging Face Switch Transformer into a streamable ONNX artifact.

Export needs the core install (numpy, onnx, onnxruntime); validation against PyTorch and
``pytorch_model.bin`` checkpoints need the ``export`` extra (torch, transformers). The
runtime (``swapmoe_edge``) never imports this package.
"""

from .exporter import export_checkpoint

__all__ = ["export_checkpoint"]
