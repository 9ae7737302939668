"""Reading recipes: YAML text → validated :class:`~attnkit.recipes.schema.Recipe`, with line numbers in errors.

Only safe YAML is read (``yaml.SafeLoader`` semantics: no Python object is ever instantiated from YAML), with three
changes that make recipes mean what they look like:

* numbers follow YAML 1.2: ``4e-1`` is the float 0.4 (YAML 1.1 reads it as a string), ``2:30`` is a string (YAML 1.1
  reads it as the base-60 integer 150) and ``010`` is ten (not octal eight); ``true``/``false``/``yes``/``no`` stay
  booleans;
* a key given twice in one mapping is an error (YAML loaders otherwise keep the last one silently);
* documents nested deeper than :data:`MAX_DEPTH` are refused.

Example:
    >>> r = loads_recipe("name: demo\\nversion: 1\\ninterventions:\\n  - method: noop\\n")
    >>> r.name, [e["method"] for e in r.interventions]
    ('demo', ['noop'])
    >>> loads_recipe("name: demo\\nversion: 1\\ninterventions:\\n  - method: noop\\n    layrs: [0]\\n")
    Traceback (most recent call last):
    ...
    attnkit.recipes.schema.RecipeError: <string>:5: interventions[0].layrs: unknown key 'layrs'; did you mean 'layers'? (allowed: method, layers, heads, modules, component, target, params)
    >>> read_yaml("a: 4e-1\\nb: 2:30\\nc: 010\\n", "<string>")[0]
    {'a': 0.4, 'b': '2:30', 'c': 10}
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path

import yaml

from attnkit.recipes.schema import Recipe, RecipeError

#: the file :meth:`attnkit.Handle.save` writes next to a checkpoint; ``load_recipe(folder)`` reads it back
SAVED_RECIPE = "attnkit_recipe.yaml"

#: deepest nesting of mappings/sequences a recipe may have (real recipes use 5)
MAX_DEPTH = 32

_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                        |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                        |[0-9][0-9_]*[eE][-+]?[0-9]+)
                     |[-+]?\.(?:inf|Inf|INF)
                     |\.(?:nan|NaN|NAN))$""", re.X)
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers and duplicate-key detection (see the module docstring)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # unhashable key: the base class reports it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first.start_mark.line + 1}); "
                                    "give each key once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        if text.startswith("0o"):
            return int(text[2:], 8)
        return int(text, 16) if text.startswith("0x") else int(text)


# YAML 1.2 numbers: drop YAML 1.1's int/float resolvers (base 60, octal 010, floats needing a dot) for ours.
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))
_RecipeLoader.add_constructor(_INT_TAG, _RecipeLoader.construct_yaml_int)


def _key_of(loader: _RecipeLoader, key_node):
    """The Python value of a mapping key node (its raw text when it is not a scalar)."""
    if key_node.tag == "tag:yaml.org,2002:merge":
        return "<<"
    if isinstance(key_node, yaml.ScalarNode):
        return loader.construct_object(key_node, deep=True)
    return key_node.value if isinstance(key_node.value, str) else repr(key_node.start_mark)


def _check_depth(text: str, source: str) -> None:
    """Refuse documents nested deeper than :data:`MAX_DEPTH` (an iterative pass: no recursion on deep input)."""
    depth = 0
    for event in yaml.parse(text, Loader=_RecipeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise RecipeError(f"{source}:{event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep; "
                                  "a recipe needs at most 5")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _line_map(loader: _RecipeLoader, root) -> dict[tuple, int]:
    """``{field path: 1-based line}`` for every mapping key and sequence item under ``root``."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if node is None:
            return
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = _key_of(loader, key_node)
                lines.setdefault(path + (key,), key_node.start_mark.line + 1)
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    walk(root, ())
    return lines


def _yaml_error(err: yaml.YAMLError, source: str) -> RecipeError:
    mark = getattr(err, "problem_mark", None)
    loc = f"{source}:{mark.line + 1}" if mark is not None else f"{source}:1"
    return RecipeError(f"{loc}: invalid YAML: {getattr(err, 'problem', None) or err}")


def read_yaml(text: str, source: str = "<string>") -> tuple[object, dict[tuple, int]]:
    """``(data, lines)`` of one YAML document read as recipes are (see the module docstring); raises
    :class:`RecipeError` naming ``source`` and the line for invalid YAML.

    Example:
        >>> read_yaml("a: 1\\na: 2\\n", "r.yaml")
        Traceback (most recent call last):
        ...
        attnkit.recipes.schema.RecipeError: r.yaml:2: invalid YAML: duplicate key 'a' (first given on line 1); give each key once
    """
    try:
        _check_depth(text, source)
        loader = _RecipeLoader(text)
        try:
            root = loader.get_single_node()
            lines = _line_map(loader, root)
            data = loader.construct_document(root) if root is not None else None
            lines.setdefault((), 1)  # an empty document: whole-document errors point at line 1
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise _yaml_error(err, source) from None
    return data, lines


def loads_recipe(text: str, source: str = "<string>") -> Recipe:
    """Parse and validate recipe YAML text."""
    data, lines = read_yaml(text, source)
    return Recipe.from_dict(data, source=source, lines=lines)


def presets_dir():
    """The packaged presets folder (``attnkit/recipes/presets``)."""
    return resources.files("attnkit.recipes") / "presets"


def list_presets() -> list[str]:
    """Names of the packaged preset recipes.

    Example:
        >>> "noop" in list_presets()
        True
    """
    return sorted(p.name[: -len(".yaml")] for p in presets_dir().iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path) -> Recipe:
    """A recipe from a YAML file path or a packaged preset name ("did you mean" on typos).

    Example:
        >>> load_recipe("noop").name
        'noop'
    """
    if isinstance(name_or_path, Recipe):
        return name_or_path
    text_path = Path(str(name_or_path)).expanduser()
    if text_path.is_dir() and (text_path / SAVED_RECIPE).is_file():  # a folder written by Handle.save
        text_path = text_path / SAVED_RECIPE
    looks_like_path = text_path.suffix in (".yaml", ".yml") or "/" in str(name_or_path) or text_path.exists()
    if looks_like_path:
        if not text_path.is_file():
            what = "is a folder, not a file" if text_path.is_dir() else "does not exist"
            raise FileNotFoundError(f"recipe file {text_path} {what}; pass a .yaml file or a preset name "
                                    "(attnkit presets lists them)")
        try:
            text = text_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise RecipeError(f"{text_path}: cannot read the recipe: {err}") from None
        return loads_recipe(text, source=str(text_path))
    preset = presets_dir() / f"{name_or_path}.yaml"
    if not preset.is_file():
        names = list_presets()
        close = difflib.get_close_matches(str(name_or_path), names, n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown recipe {name_or_path!r}{hint} Presets: {', '.join(names) or '(none)'}; "
                       "or pass a path to a .yaml file")
    return loads_recipe(preset.read_text(encoding="utf-8"), source=f"preset:{name_or_path}.yaml")
