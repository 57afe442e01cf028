"""The on-disk contract, read-only: manifest, expert store, ONNX references."""
