"""Typed task parameters: each task class lists its parameters (type, default, help); YAML files and ``--set``
overrides are checked against that list like recipe parameters are (unknown keys get "did you mean", wrong types
name the expected type, and errors name the file and line when they come from a file).

Example:
    >>> from typing import Literal
    >>> spec = {"split": Param(Literal["random", "popular"], "random", "negatives"), "seed": Param(int, 0, "seed")}
    >>> check_params(spec, {"split": "popular"}, "pope.yaml", {("params", "split"): 4})
    {'split': 'popular', 'seed': 0}
    >>> check_params(spec, {"splt": "popular"}, "pope.yaml", {("params", "splt"): 4})
    Traceback (most recent call last):
    ...
    attnkit.eval.errors.EvalError: pope.yaml:4: params.splt: unknown parameter 'splt'; did you mean 'split'? (parameters: seed, split)
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from attnkit.eval.errors import EvalError
from attnkit.recipes.schema import type_ok


@dataclass(frozen=True)
class Param:
    """One task parameter: its type (``int``, ``float``, ``str``, ``bool``, ``list[int]``, ``Literal[...]``,
    ``X | None``, ``Any``), its default, and one line of help."""

    type: Any
    default: Any = None
    help: str = ""


def did_you_mean(word: str, options) -> str:
    """``"; did you mean 'x'?"`` for the closest option, else ``""``."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def type_name(hint) -> str:
    """A readable name for a type hint (``Literal['a', 'b']`` → ``one of 'a', 'b'``)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"a list of {type_name(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")


def _where(source: str, lines: Mapping, key: str) -> str:
    line = lines.get(("params", key)) or lines.get(("params",))
    return f"{source}:{line}" if line else source


def check_params(spec: Mapping[str, Param], params: Mapping, source: str = "<params>",
                 lines: Mapping | None = None) -> dict:
    """Validate ``params`` against ``spec`` and return them with defaults filled in (spec order first).

    Raises :class:`EvalError` naming ``source`` (and the line, from ``lines[("params", key)]``) and the field.
    """
    lines = lines or {}
    for key, value in params.items():
        if key not in spec:
            raise EvalError(f"{_where(source, lines, key)}: params.{key}: unknown parameter {key!r}"
                            f"{did_you_mean(key, spec)} (parameters: {', '.join(sorted(spec))})")
        if not type_ok(value, spec[key].type):
            raise EvalError(f"{_where(source, lines, key)}: params.{key}: expected {type_name(spec[key].type)}, "
                            f"got {type(value).__name__} {value!r}")
    return {**{k: p.default for k, p in spec.items()}, **params}
