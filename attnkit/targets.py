"""Which layers and heads an intervention touches.

Layers: ``None`` (all), an int, a list of ints, a range string ``"2-5"`` / ``"2:6"`` (python-style end),
negative indices (``-1`` = last layer), or a mix (``[0, "4-6", -1]``).
Heads: ``None`` (all), an int or a list of ints, or a ``{layer: [heads]}`` mapping, or a ``HeadScores``-like
object selection (anything with ``.layer_heads() -> {layer: [heads]}``).
Modules: an optional regex matched (``re.search``) against the attention module's qualified name.

Example:
    >>> t = Target(layers="1-2", heads=[0, 3])
    >>> t.resolve(num_layers=4, num_heads=4)
    {1: [0, 3], 2: [0, 3]}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class TargetError(ValueError):
    """A target that matches nothing or lies outside the model."""


def _parse_layer_item(item: Any, num_layers: int) -> list[int]:
    if isinstance(item, bool):
        raise TargetError(f"layer {item!r} is not an integer")
    if isinstance(item, int):
        idx = item + num_layers if item < 0 else item
        if not 0 <= idx < num_layers:
            raise TargetError(f"layer {item} is out of range: this model has layers 0..{num_layers - 1}")
        return [idx]
    if isinstance(item, range):
        return [i for x in item for i in _parse_layer_item(x, num_layers)]
    if isinstance(item, str):
        text = item.strip()
        if re.fullmatch(r"-?\d+", text):
            return _parse_layer_item(int(text), num_layers)
        m = re.fullmatch(r"(-?\d+)\s*([-:])\s*(-?\d+)", text)
        if not m:
            raise TargetError(f"cannot read layer range {item!r}: use '2-5' (inclusive) or '2:6' (end excluded)")
        start, sep, end = int(m.group(1)), m.group(2), int(m.group(3))
        start = start + num_layers if start < 0 else start
        end = end + num_layers if end < 0 else end
        stop = end + 1 if sep == "-" else end
        if not (0 <= start < num_layers and 0 < stop <= num_layers and start < stop):
            raise TargetError(f"layer range {item!r} is out of range: this model has layers 0..{num_layers - 1}")
        return list(range(start, stop))
    raise TargetError(f"cannot read layer spec {item!r} ({type(item).__name__}); use ints, lists or 'a-b' strings")


def parse_layers(spec: Any, num_layers: int) -> list[int]:
    """Resolve a layer spec to a sorted list of layer indices (see module docstring)."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    layers = sorted({i for item in items for i in _parse_layer_item(item, num_layers)})
    if not layers:
        raise TargetError(f"layer spec {spec!r} selects no layer (valid: 0..{num_layers - 1})")
    return layers


def _check_heads(heads: list[int], num_heads: int, where: str) -> list[int]:
    for h in heads:
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < num_heads:
            raise TargetError(f"head {h!r}{where} is out of range: this model has heads 0..{num_heads - 1}")
    if not heads:
        raise TargetError(f"empty head list{where}")
    return sorted(set(heads))


@dataclass
class Target:
    """Where an intervention applies: layers × heads, optionally restricted by a module-name regex."""

    layers: Any = None
    heads: Any = None
    modules: str | None = None

    def resolve(self, num_layers: int, num_heads: int) -> dict[int, list[int]]:
        """Return ``{layer: [heads]}``; raise :class:`TargetError` naming the valid range when out of bounds."""
        heads = self.heads
        if hasattr(heads, "layer_heads"):
            heads = heads.layer_heads()
        if isinstance(heads, dict):
            per_layer = {}
            allowed = set(parse_layers(self.layers, num_layers))
            for layer, hs in heads.items():
                (idx,) = _parse_layer_item(int(layer), num_layers)
                if idx in allowed:
                    hs = [hs] if isinstance(hs, int) else list(hs)
                    per_layer[idx] = _check_heads(hs, num_heads, f" (layer {idx})")
            if not per_layer:
                raise TargetError(f"head map {self.heads!r} selects no head within layers {self.layers!r}")
            return dict(sorted(per_layer.items()))
        layers = parse_layers(self.layers, num_layers)
        if heads is None or heads == "all":
            head_list = list(range(num_heads))
        else:
            head_list = _check_heads([heads] if isinstance(heads, int) else list(heads), num_heads, "")
        return {layer: head_list for layer in layers}

    def matches_module(self, qualified_name: str) -> bool:
        return self.modules is None or re.search(self.modules, qualified_name) is not None
