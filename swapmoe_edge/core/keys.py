"""Typed names of a MoE model's parts: ``ExpertKey``, ``LayerKey`` and their string forms."""

from __future__ import annotations

from dataclasses import dataclass

STACKS = ("encoder", "decoder")
STACK_PREFIX = {"encoder": "enc", "decoder": "dec"}
_STACK_OF_PREFIX = {p: s for s, p in STACK_PREFIX.items()}


@dataclass(frozen=True, order=True)
class ExpertKey:
    """One expert of one sparse layer: ``ExpertKey("decoder", 5, 17)`` is ``dec.L05.E17``."""

    stack: str
    layer: int
    expert: int

    @property
    def name(self) -> str:
        return f"{STACK_PREFIX[self.stack]}.L{self.layer:02d}.E{self.expert:02d}"

    @property
    def layer_key(self) -> "LayerKey":
        return LayerKey(self.stack, self.layer)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True)
class LayerKey:
    stack: str
    layer: int

    @property
    def name(self) -> str:
        return f"{STACK_PREFIX[self.stack]}.L{self.layer:02d}"

    def __str__(self) -> str:
        return self.name



def parse_layer_name(name: str) -> LayerKey:
    """``"dec.L05"`` -> ``LayerKey("decoder", 5)``; the inverse of ``LayerKey.name``."""
    prefix, _, rest = name.partition(".L")
    if prefix not in _STACK_OF_PREFIX or not rest.isdigit():
        raise ValueError(f"{name!r} is not a layer name like 'enc.L01' or 'dec.L05'")
    return LayerKey(_STACK_OF_PREFIX[prefix], int(rest))
