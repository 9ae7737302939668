"""The recipe schema: what a recipe may contain, checked field by field with errors naming file, line and field.

Format (YAML, read with ``yaml.safe_load`` semantics only)::

    name: act-llama              # required, str
    version: 1                   # required, int or str
    description: ...             # optional, str
    tuned_for: llama-2-7b        # optional, str: the model whose paper/code values the parameters are
    backend: auto                # optional: auto | eager | torch | triton (default auto)
    targets:                     # optional named targets, referenced by `target:` below
      late: {layers: "2-30"}
    interventions:               # required list, applied in this order (explicit stacking order)
      - method: act              # a registered intervention name
        layers: "2-30"           # int | "a-b" | "a:b" | list of those | all (default all)
        heads: [0, 3]            # int | list | {layer: [heads]} | {scores: path-or-name, top_k: N | threshold: x,
                                 #                                   per_layer: bool} | all (default all)
        modules: "self_attn"     # optional regex on the attention module's qualified name
        component: text          # optional: which attention stack (text, vision, unet, transformer, …)
        target: late             # optional: use a named target instead of layers/heads/modules
        params: {beta: 0.4}      # keyword arguments of the intervention's constructor

Unknown keys, wrong types, unknown methods and unknown parameters are errors ("did you mean …?"); so are non-finite
numbers (``.inf``, ``.nan``) anywhere in ``params``, integers beyond 64 bits, layer strings that are not ranges and
``modules`` patterns that are not valid regular expressions.
Two entries of the same method, or two interventions declaring the same ``exclusive`` slot (e.g. two KV-cache
policies), are conflicts; the core additionally rejects two group reweightings on the same heads at attach time.

Example:
    >>> r = Recipe.from_dict({"name": "demo", "version": 1,
    ...                       "interventions": [{"method": "noop", "layers": [0], "params": {"hooks": ["edit_output"]}}]})
    >>> [iv.name for iv in r.build_interventions()], r.backend
    (['noop'], 'auto')
    >>> Recipe.from_dict({"name": "x", "version": 1, "interventions": [{"method": "noop", "parms": {}}]})
    Traceback (most recent call last):
    ...
    attnkit.recipes.schema.RecipeError: <dict>: interventions[0].parms: unknown key 'parms'; did you mean 'params'? (allowed: method, layers, heads, modules, component, target, params)
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnkit.kernels.backends import REQUESTABLE as BACKENDS  # the one list of backends

TOP_KEYS = ("name", "version", "description", "tuned_for", "backend", "targets", "interventions")
ENTRY_KEYS = ("method", "layers", "heads", "modules", "component", "target", "params")
TARGET_KEYS = ("layers", "heads", "modules", "component")
SCORES_KEYS = ("scores", "top_k", "threshold", "per_layer")
TARGET_KWARGS = ("layers", "heads", "modules", "component")


class RecipeError(ValueError):
    """An invalid recipe; the message names the file, the line (when known) and the field."""


INT_LIMIT = 2**63  # integers in a recipe must fit a signed 64-bit tensor element
_LAYER_STRING = re.compile(r"\s*-?\d{1,9}\s*(?:[-:]\s*-?\d{1,9}\s*)?")


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class _Where:
    """Builds error messages: ``file:line: field: message``."""

    def __init__(self, source: str, lines: dict):
        self.source, self.lines = source, lines

    def error(self, path: tuple, message: str) -> RecipeError:
        line = None
        for cut in range(len(path), -1, -1):  # the nearest ancestor whose line we know
            line = self.lines.get(tuple(path[:cut]))
            if line is not None:
                break
        loc = f"{self.source}:{line}" if line is not None else self.source
        field_name = _fmt_path(path)
        return RecipeError(f"{loc}: {field_name}: {message}" if field_name else f"{loc}: {message}")


# ---- type checking of params against constructor signatures --------------------------------------------------
def type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from YAML) fits the type hint ``hint``; ints are accepted where floats are
    expected, NaN is not a float here. Shared by recipes and eval task files.

    Example:
        >>> type_ok(3, float), type_ok(True, int), type_ok([1, 2], list[int]), type_ok("x", int | None)
        (True, False, True, False)
    """
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(type_ok(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(any(type_ok(v, a) for a in args) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # unknown typing construct: do not guess


def _hint_from_default(default: Any):
    if default is inspect.Parameter.empty or default is None:
        return Any
    if isinstance(default, bool):
        return bool
    if isinstance(default, float):
        return float
    if isinstance(default, int):
        return int
    if isinstance(default, str):
        return str
    if isinstance(default, (list, tuple)):
        return list
    if isinstance(default, dict):
        return dict
    return Any


def _hint_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def constructor_params(cls) -> dict[str, tuple[Any, Any]]:
    """``{param: (hint, default)}`` of an intervention constructor, without ``self`` and the target kwargs."""
    sig = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to defaults
        hints = {}
    out = {}
    for name, p in sig.parameters.items():
        if name == "self" or name in TARGET_KWARGS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[name] = (hints.get(name, _hint_from_default(p.default)), p.default)
    return out


def _first_bad_number(value, path: tuple = ()) -> tuple[tuple, Any] | None:
    """``(sub-path, value)`` of the first non-finite float or out-of-range int inside ``value``, else None.

    Example:
        >>> _first_bad_number({"a": [1.0, float("inf")]})
        (('a', 1), inf)
    """
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT_LIMIT:
        return path, value
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        found = _first_bad_number(v, path + (k,))
        if found is not None:
            return found
    return None


def check_params(cls, params: dict, where: _Where, path: tuple) -> None:
    """Raise for unknown, missing or mistyped constructor parameters of ``cls``."""
    spec = constructor_params(cls)
    for key, value in params.items():
        if key in TARGET_KWARGS:
            raise where.error(path + (key,), f"{key!r} is a target field: put it next to `method`, not in params")
        if key not in spec:
            allowed = ", ".join(spec) or "(none)"
            raise where.error(path + (key,), f"unknown parameter {key!r} for method {cls.name!r}"
                              f"{_did_you_mean(key, spec)} (parameters: {allowed})")
        hint, _ = spec[key]
        bad = _first_bad_number(value)
        if bad is not None:
            sub, number = bad
            why = "expected a finite number" if isinstance(number, float) else "expected an integer below 2**63"
            raise where.error(path + (key,) + sub, f"{why}, got {number!r}")
        if not type_ok(value, hint):
            raise where.error(path + (key,), f"expected {_hint_name(hint)}, got {type(value).__name__} {value!r}")
    missing = [k for k, (_, d) in spec.items() if d is inspect.Parameter.empty and k not in params]
    if missing:
        raise where.error(path, f"method {cls.name!r} needs parameter(s) {', '.join(missing)}")


# ---- field checks -----------------------------------------------------------------------------------------------
def _check_layers(value, where: _Where, path: tuple) -> None:
    items = value if isinstance(value, list) else [value]
    if value is None or value == "all":
        return
    for i, item in enumerate(items):
        sub = path + (i,) if isinstance(value, list) else path
        ok = (isinstance(item, int) and not isinstance(item, bool) and abs(item) < INT_LIMIT) or (
            isinstance(item, str) and _LAYER_STRING.fullmatch(item) is not None)
        if not ok:
            raise where.error(sub, f"expected a layer index or a range string like '2-5' (inclusive) or '2:6' (end "
                                   f"excluded), got {item!r}")


def _check_heads(value, where: _Where, path: tuple, base_dir: Path | None) -> None:
    if value is None or value == "all":
        return
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < INT_LIMIT:
        return
    if isinstance(value, list):
        for i, h in enumerate(value):
            if isinstance(h, bool) or not isinstance(h, int) or abs(h) >= INT_LIMIT:
                raise where.error(path + (i,), f"expected a head index (int), got {h!r}")
        return
    if isinstance(value, dict) and "scores" in value:
        for key in value:
            if key not in SCORES_KEYS:
                raise where.error(path + (key,), f"unknown key {key!r} in a scores target{_did_you_mean(key, SCORES_KEYS)}"
                                  f" (allowed: {', '.join(SCORES_KEYS)})")
        if not isinstance(value["scores"], str):
            raise where.error(path + ("scores",), "expected a path or name of saved HeadScores (str)")
        if ("top_k" in value) == ("threshold" in value):
            raise where.error(path, "a scores target needs exactly one of top_k or threshold")
        if "top_k" in value and (isinstance(value["top_k"], bool) or not isinstance(value["top_k"], int)
                                 or value["top_k"] < 1):
            raise where.error(path + ("top_k",), f"expected a positive int, got {value['top_k']!r}")
        if "threshold" in value and (not type_ok(value["threshold"], float)
                                     or not math.isfinite(value["threshold"])):
            raise where.error(path + ("threshold",), f"expected a number, got {value['threshold']!r}")
        if "per_layer" in value and not isinstance(value["per_layer"], bool):
            raise where.error(path + ("per_layer",), f"expected true/false, got {value['per_layer']!r}")
        try:
            resolve_scores_path(value["scores"], base_dir)
        except FileNotFoundError as err:
            raise where.error(path + ("scores",), str(err)) from None
        return
    if isinstance(value, dict):
        for layer, hs in value.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or abs(layer) >= INT_LIMIT:
                raise where.error(path + (layer,), f"head map keys must be layer indices (int), got {layer!r}")
            _check_heads(hs, where, path + (layer,), base_dir)
            if isinstance(hs, dict) or hs is None:
                raise where.error(path + (layer,), "expected a head index or a list of head indices")
        return
    raise where.error(path, f"expected all, a head index, a list, a {{layer: [heads]}} map or {{scores: …, top_k: N}},"
                            f" got {type(value).__name__} {value!r}")


def scores_dirs() -> list[Path]:
    """Where named HeadScores are looked up: ``$ATTNKIT_SCORES`` then the packaged ``recipes/scores/``."""
    import os

    dirs = []
    if os.environ.get("ATTNKIT_SCORES"):
        dirs.append(Path(os.environ["ATTNKIT_SCORES"]).expanduser())
    dirs.append(Path(__file__).resolve().parent / "scores")
    return dirs


def resolve_scores_path(name_or_path: str, base_dir: Path | None = None) -> Path:
    """A saved HeadScores file: a path (relative to the recipe's folder, then the working directory) or a name."""
    raw = Path(name_or_path).expanduser()
    candidates = [raw] if raw.is_absolute() else ([base_dir / raw] if base_dir else []) + [raw]
    candidates += [d / name_or_path for d in scores_dirs()]
    for cand in candidates:
        for path in (cand, cand.with_suffix(".safetensors") if cand.suffix != ".safetensors" else cand):
            if path.suffix == ".safetensors" and path.exists():
                return path
            if path.suffix == ".json" and path.with_suffix(".safetensors").exists():
                return path.with_suffix(".safetensors")
    raise FileNotFoundError(f"no saved HeadScores {name_or_path!r} (looked in: "
                            f"{', '.join(str(c) for c in candidates)})")


def resolve_heads(value, base_dir: Path | None):
    """Turn a validated ``heads`` field into what :class:`~attnkit.targets.Target` accepts."""
    if isinstance(value, dict) and "scores" in value:
        from attnkit.scores import HeadScores

        scores = HeadScores.load(resolve_scores_path(value["scores"], base_dir))
        if "top_k" in value:
            return scores.top_k(value["top_k"], per_layer=value.get("per_layer", False))
        return scores.threshold(float(value["threshold"]))
    return value


# ---- the Recipe object ---------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """A validated recipe. ``build_interventions()`` makes fresh Intervention objects in stacking order."""

    name: str
    version: Any
    interventions: list[dict]
    backend: str = "auto"
    description: str = ""
    targets: dict = field(default_factory=dict)
    source: str = "<dict>"
    lines: dict = field(default_factory=dict, repr=False, compare=False)
    tuned_for: str | None = None

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>", lines: dict | None = None) -> "Recipe":
        """Validate a plain dict (as read from YAML) and build a Recipe; raises :class:`RecipeError`."""
        where = _Where(source, lines or {})
        base_dir = Path(source).resolve().parent if source not in ("<dict>", "<string>") else None
        if not isinstance(data, dict):
            raise where.error((), f"a recipe must be a mapping with keys {', '.join(TOP_KEYS)}, got "
                                  f"{type(data).__name__}")
        for key in data:
            if key not in TOP_KEYS:
                raise where.error((key,), f"unknown key {key!r}{_did_you_mean(key, TOP_KEYS)} "
                                          f"(allowed: {', '.join(TOP_KEYS)})")
        for key in ("name", "version", "interventions"):
            if key not in data:
                raise where.error((), f"missing required field {key!r}")
        if not isinstance(data["name"], str) or not data["name"]:
            raise where.error(("name",), f"expected a non-empty string, got {data['name']!r}")
        if isinstance(data["version"], bool) or not isinstance(data["version"], (int, str)):
            raise where.error(("version",), f"expected an int or a string, got {data['version']!r}")
        if not isinstance(data.get("description", ""), str):
            raise where.error(("description",), "expected a string")
        tuned_for = data.get("tuned_for")
        if tuned_for is not None and (not isinstance(tuned_for, str) or not tuned_for.strip()):
            raise where.error(("tuned_for",), f"expected the name of a model (e.g. llava-1.5-7b), got {tuned_for!r}")
        backend = data.get("backend", "auto")
        if backend not in BACKENDS:
            raise where.error(("backend",), f"unknown backend {backend!r}{_did_you_mean(backend, BACKENDS)} "
                                            f"(choose from {', '.join(BACKENDS)})")
        targets = data.get("targets") or {}
        if not isinstance(targets, dict):
            raise where.error(("targets",), "expected a mapping of target names to {layers, heads, modules, component}")
        for tname, tspec in targets.items():
            cls._check_target_fields(tspec, where, ("targets", tname), base_dir, TARGET_KEYS)
        entries = data["interventions"]
        if not isinstance(entries, list):
            raise where.error(("interventions",), f"expected a list of interventions, got {type(entries).__name__}")
        recipe = cls(data["name"], data["version"], [dict(e) if isinstance(e, dict) else e for e in entries],
                     backend, data.get("description", ""), dict(targets), source, dict(lines or {}), tuned_for)
        recipe._validate_entries(where, base_dir)
        return recipe

    @staticmethod
    def _check_target_fields(spec, where, path, base_dir, allowed) -> None:
        if not isinstance(spec, dict):
            raise where.error(path, f"expected a mapping, got {type(spec).__name__} {spec!r}")
        for key in spec:
            if key not in allowed:
                raise where.error(path + (key,), f"unknown key {key!r}{_did_you_mean(key, allowed)} "
                                                 f"(allowed: {', '.join(allowed)})")
        if "layers" in spec:
            _check_layers(spec["layers"], where, path + ("layers",))
        if "heads" in spec:
            _check_heads(spec["heads"], where, path + ("heads",), base_dir)
        for key in ("modules", "component"):
            if spec.get(key) is not None and not isinstance(spec[key], str):
                raise where.error(path + (key,), f"expected a string, got {spec[key]!r}")
        if spec.get("modules") is not None:
            try:
                re.compile(spec["modules"])
            except re.error as err:
                raise where.error(path + ("modules",), f"{spec['modules']!r} is not a valid regular expression "
                                                       f"({err}); escape special characters such as '.' or '['") from None

    def _validate_entries(self, where: _Where, base_dir: Path | None) -> None:
        from attnkit.interventions import INTERVENTIONS, load_builtin, load_plugins

        load_builtin()
        seen: dict[str, int] = {}
        exclusive: dict[str, int] = {}
        for i, entry in enumerate(self.interventions):
            path = ("interventions", i)
            self._check_target_fields(entry, where, path, base_dir, ENTRY_KEYS)
            method = entry.get("method")
            if not isinstance(method, str):
                raise where.error(path, "missing required field 'method' (a registered intervention name)")
            if method not in INTERVENTIONS:
                load_plugins()  # a package that declares it may have been installed since the first look
            if method not in INTERVENTIONS:
                raise where.error(path + ("method",), f"unknown method {method!r}"
                                  f"{_did_you_mean(method, INTERVENTIONS.names())} "
                                  f"(known: {', '.join(INTERVENTIONS.names())})")
            if "target" in entry:
                if not isinstance(entry["target"], str) or entry["target"] not in self.targets:
                    raise where.error(path + ("target",), f"unknown target {entry['target']!r}"
                                      f"{_did_you_mean(entry['target'], self.targets)} "
                                      f"(defined: {', '.join(self.targets) or '(none)'})")
                clash = [k for k in TARGET_KEYS if k in entry]
                if clash:
                    raise where.error(path + (clash[0],), "give either `target:` or explicit layers/heads/modules/"
                                                          "component, not both")
            if method in seen:
                raise where.error(path + ("method",), f"{method!r} already appears as interventions[{seen[method]}]; "
                                                      "give one entry per method")
            seen[method] = i
            cls = INTERVENTIONS.get(method)
            slot = getattr(cls, "exclusive", None)
            if slot:
                if slot in exclusive:
                    raise where.error(path + ("method",), f"{method!r} conflicts with interventions[{exclusive[slot]}]:"
                                                          f" both are {slot!r} interventions and only one may be active")
                exclusive[slot] = i
            params = entry.get("params") or {}
            if not isinstance(params, dict):
                raise where.error(path + ("params",), f"expected a mapping of parameters, got {params!r}")
            check_params(cls, params, where, path + ("params",))
            try:  # constructors validate their own value ranges; report those with the entry's line
                self._build_one(entry, base_dir)
            except RecipeError:
                raise
            except Exception as err:  # noqa: BLE001 - a constructor refusing a value is a recipe error
                msg = str(err).strip("'\"")
                if not isinstance(err, (ValueError, TypeError, KeyError)):
                    msg = f"invalid parameters ({type(err).__name__}: {msg})"
                raise where.error(path, msg if msg.startswith(f"{method}:") else f"{method}: {msg}") from None

    def _target_of(self, entry: dict) -> dict:
        spec = self.targets[entry["target"]] if "target" in entry else entry
        return {k: spec[k] for k in TARGET_KEYS if k in spec}

    def _build_one(self, entry: dict, base_dir: Path | None):
        from attnkit.interventions import INTERVENTIONS

        target = self._target_of(entry)
        if "heads" in target:
            target["heads"] = resolve_heads(target["heads"], base_dir)
        return INTERVENTIONS.get(entry["method"])(**(entry.get("params") or {}), **target)

    @classmethod
    def from_interventions(cls, interventions, name: str = "saved", backend: str = "auto",
                           description: str = "") -> "Recipe":
        """The recipe that rebuilds ``interventions`` (from :meth:`attnkit.Intervention.config`); raises a
        RecipeError naming the intervention and field when a value has no YAML form (a tensor, a HeadScores object:
        save those to a file and refer to it by path).

        Example:
            >>> from attnkit.interventions.noop import Noop
            >>> print(Recipe.from_interventions([Noop(layers=[1])], name="one").to_yaml().strip())
            name: one
            version: 1
            backend: auto
            interventions:
            - method: noop
              layers:
              - 1
        """
        import yaml

        entries = []
        for i, iv in enumerate(interventions):
            config = iv.config()
            entry: dict = {"method": iv.name}
            for key in TARGET_KWARGS:
                if config.get(key) is not None:
                    entry[key] = config.pop(key)
                config.pop(key, None)
            params = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
            if params:
                entry["params"] = params
            try:
                yaml.safe_dump(entry)
            except yaml.representer.RepresenterError as err:
                raise RecipeError(f"interventions[{i}] ({iv.name}): {err.args[1]!r} has no YAML form; save it to a "
                                  "file and refer to it by path") from None
            entries.append(entry)
        return cls.from_dict({"name": name, "version": 1, "backend": backend, "interventions": entries,
                              **({"description": description} if description else {})})

    def build_interventions(self) -> list:
        """Fresh Intervention objects, in the recipe's stacking order."""
        base_dir = Path(self.source).resolve().parent if self.source not in ("<dict>", "<string>") else None
        return [self._build_one(e, base_dir) for e in self.interventions]

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.description:
            out["description"] = self.description
        if self.tuned_for:
            out["tuned_for"] = self.tuned_for
        out["backend"] = self.backend
        if self.targets:
            out["targets"] = self.targets
        out["interventions"] = [dict(e) for e in self.interventions]
        return out

    def to_yaml(self) -> str:
        """The recipe as YAML (loads back to an equal recipe).

        Example:
            >>> r = Recipe.from_dict({"name": "d", "version": 1, "interventions": [{"method": "noop"}]})
            >>> print(r.to_yaml().strip())
            name: d
            version: 1
            backend: auto
            interventions:
            - method: noop
        """
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def locate_error(self, message: str) -> str:
        """``file:line: field: message`` for an attach-time error about this recipe: the entry whose method the
        message names (the later one for a conflict between two), ``backend`` for a backend refusal.

        Example:
            >>> r = Recipe.from_dict({"name": "d", "version": 1, "interventions": [{"method": "noop"}]})
            >>> r.locate_error("noop: layer 9 is out of range")
            '<dict>: interventions[0]: noop: layer 9 is out of range'
        """
        if message.startswith(f"{self.source}:"):
            return message
        path: tuple = ("interventions",)
        named = [i for i, e in enumerate(self.interventions)
                 if re.search(rf"(?<![\w-]){re.escape(str(e.get('method')))}(?![\w-])", message)]
        first = next((i for i, e in enumerate(self.interventions) if message.startswith(f"{e.get('method')}:")), None)
        if first is not None:
            path = ("interventions", first)
        elif named:
            path = ("interventions", named[-1])
        elif message.startswith("layer ") and self.backend != "auto":
            path = ("backend",)
        return str(_Where(self.source, self.lines).error(path, message))

    def describe(self) -> str:
        methods = " → ".join(e["method"] for e in self.interventions) or "(no interventions)"
        return f"{self.name} v{self.version} [{self.backend}]: {methods}"
