"""swapmoe_edge: serve Switch Transformer MoE models inside a tunable memory budget.

The runtime reads an artifact written by ``swapmoe export`` (see ``manifest.py``) and
never imports torch or transformers.
"""

__version__ = "0.1.0"
