"""Model families: how an artifact's manifest becomes a model that runs, and how it generates.

One module per family, found by the name the manifest records (``extra["family"]``; artifacts
that name none are Switch Transformers), each with a ``FAMILY``. The runtime and the residency
code hold a ``Family`` and never ask which one it is:

- ``build(manifest, sessions, moe, hook=None)``: the model's parts from the manifest: its blocks
  (dense subgraphs run in order), each sparse layer handed to ``moe``;
- ``route(logits, capacity, allowed=None, renormalize=False)``: its router, top-``top_k`` with
  the family's capacity and gate rules (an absent choice goes to the best allowed expert);
  ``exact_moe(run_expert, capacity)``: a sparse layer's MoE with every expert available;
- ``generate(model, rows, decoding, hook=None)``: its generation loop (``kind``), a generator
  of ``generate.Step``s;
- ``embedding_files``, ``touch_embeddings``, ``envelope_pass``: what the memory baseline needs
  to know: which files are read row by row, and the largest pass a request makes;
- ``check(manifest)``: ArtifactError unless the manifest names every subgraph and layer part
  that ``build`` runs (load calls it before anything is opened);
- ``bind(manifest)`` (optional): the family as one model runs it, e.g. a router with that
  model's k; ``family_of`` applies it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from swapmoe_edge.artifact.manifest import Manifest
from swapmoe_edge.core.errors import ArtifactError
from swapmoe_edge.model.generate import Step
from swapmoe_edge.model.moe import Routing

KINDS = ("encoder-decoder", "decoder-only")
FAMILIES = ("switch", "causal")  # module names under this package
DEFAULT = "switch"  # what an artifact that names no family is


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # which generation loop: one of KINDS
    top_k: int  # experts per token (Switch: 1)
    build: Callable[..., Any]
    route: Callable[..., Routing]
    exact_moe: Callable[..., Callable]
    generate: Callable[..., Iterator[Step]]
    embedding_files: Callable[[Manifest], set[str]]
    touch_embeddings: Callable[[Any], None]
    envelope_pass: Callable[[Any, int], None]
    check: Callable[[Manifest], None] = lambda manifest: None
    # bind(manifest) -> the family as this model runs it (its k, its gate rule); None: the same for every model
    bind: Callable[[Manifest], "Family"] | None = None

    def __post_init__(self):
        assert self.kind in KINDS and self.top_k >= 1, (self.kind, self.top_k)


def get_family(name: str) -> Family:
    """The family registered as ``name``; ArtifactError if this runtime has none of that name."""
    if name not in FAMILIES:
        raise ArtifactError(f"this runtime cannot run models of the {name!r} family (it knows: {', '.join(FAMILIES)}); "
                            "update swapmoe_edge, or export a model of a known family.")
    return importlib.import_module(f"{__name__}.{name}").FAMILY


def family_of(manifest: Manifest) -> Family:
    """The family the artifact's manifest names, bound to that model where the family needs it."""
    family = get_family(str(manifest.extra.get("family", DEFAULT)))
    return family.bind(manifest) if family.bind is not None else family
