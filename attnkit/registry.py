"""A small generic registry: names → objects, with "did you mean …?" errors.

Example:
    >>> reg = Registry("colour")
    >>> @reg.register("red")
    ... class Red: ...
    >>> reg.get("red") is Red
    True
    >>> reg.get("rde")
    Traceback (most recent call last):
    ...
    KeyError: "unknown colour 'rde'; did you mean 'red'? Known: red"
"""

from __future__ import annotations

import difflib
from typing import Any, Iterator


class Registry:
    """Maps names to objects (classes, functions, file paths). Registering a taken name raises."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj`` return a decorator."""
        if obj is None:
            return lambda o: self.register(name, o)
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> Any:
        """Return the object registered as ``name``, or raise ``KeyError`` with close matches."""
        if name in self._items:
            return self._items[name]
        close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown {self.kind} {name!r}{hint} Known: {', '.join(sorted(self._items)) or '(none)'}")

    def unregister(self, name: str) -> Any:
        """Remove ``name`` and return what it named (e.g. a plug-in unloaded in a test); KeyError if unknown."""
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}")
        return self._items.pop(name)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

