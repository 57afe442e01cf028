"""swapmoe_export: split a Hugging Face Switch Transformer into a streamable ONNX artifact.

Needs the ``export`` extra (torch, transformers, onnx, safetensors). The runtime
(``swapmoe_edge``) never imports this package.
"""

from .exporter import export_checkpoint

__all__ = ["export_checkpoint"]
