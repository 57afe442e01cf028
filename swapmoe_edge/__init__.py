"""swapmoe_edge: serve Switch Transformer MoE models inside a tunable memory budget.

    from swapmoe_edge import Runtime, RuntimeConfig

    with Runtime("artifact/", RuntimeConfig(policy="swapmoe", budget="33%")) as rt:
        print(rt.summarize(["a long text ..."])[0].summary)

``load(artifact, config)`` returns the parts a Runtime is made of; ``load_model`` only the
model, with no budget, monitor or thread. The runtime reads an artifact written by
``swapmoe export`` (see ``artifact/manifest.py``) and never imports torch or transformers.
Importing this package is cheap: these names bring in the runtime (ONNX Runtime, numpy) when
first used.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms); checkers read the name
__version__ = "0.1.0"

_HOMES = {
    "Runtime": "swapmoe_edge.runtime.facade",
    "RuntimeConfig": "swapmoe_edge.runtime.config",
    "Result": "swapmoe_edge.runtime.stats",
    "Parts": "swapmoe_edge.runtime.load",
    "ModelParts": "swapmoe_edge.runtime.load",
    "load": "swapmoe_edge.runtime.load",
    "load_model": "swapmoe_edge.runtime.load",
}
__all__ = sorted(_HOMES)

if TYPE_CHECKING:
    from swapmoe_edge.runtime.config import RuntimeConfig
    from swapmoe_edge.runtime.facade import Runtime
    from swapmoe_edge.runtime.load import ModelParts, Parts, load, load_model
    from swapmoe_edge.runtime.stats import Result


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'swapmoe_edge' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
