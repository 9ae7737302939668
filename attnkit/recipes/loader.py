"""Reading recipes: YAML text → validated :class:`~attnkit.recipes.schema.Recipe`, with line numbers in errors.

Only safe YAML is read: the text is composed into a node tree with ``yaml.SafeLoader`` (to learn the line of every
field) and constructed with ``yaml.safe_load``; no Python object is ever instantiated from YAML.

Example:
    >>> r = loads_recipe("name: demo\\nversion: 1\\ninterventions:\\n  - method: noop\\n")
    >>> r.name, [e["method"] for e in r.interventions]
    ('demo', ['noop'])
    >>> loads_recipe("name: demo\\nversion: 1\\ninterventions:\\n  - method: noop\\n    layrs: [0]\\n")
    Traceback (most recent call last):
    ...
    attnkit.recipes.schema.RecipeError: <string>:5: interventions[0].layrs: unknown key 'layrs'; did you mean 'layers'? (allowed: method, layers, heads, modules, component, target, params)
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

import yaml

from attnkit.recipes.schema import Recipe, RecipeError


def _line_map(text: str) -> dict[tuple, int]:
    """``{field path: 1-based line}`` for every mapping key and sequence item of a YAML document."""
    lines: dict[tuple, int] = {}
    root = yaml.compose(text, Loader=yaml.SafeLoader)

    def walk(node, path):
        if node is None:
            return
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                try:
                    key = yaml.safe_load(yaml.serialize(key_node))
                except yaml.YAMLError:
                    key = key_node.value
                lines[path + (key,)] = key_node.start_mark.line + 1
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    walk(root, ())
    return lines


def loads_recipe(text: str, source: str = "<string>") -> Recipe:
    """Parse and validate recipe YAML text."""
    try:
        data = yaml.safe_load(text)
        lines = _line_map(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = f"{source}:{mark.line + 1}" if mark is not None else source
        raise RecipeError(f"{loc}: invalid YAML: {getattr(err, 'problem', None) or err}") from None
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
    looks_like_path = text_path.suffix in (".yaml", ".yml") or "/" in str(name_or_path) or text_path.exists()
    if looks_like_path:
        if not text_path.exists():
            raise FileNotFoundError(f"recipe file {text_path} does not exist")
        return loads_recipe(text_path.read_text(), source=str(text_path))
    preset = presets_dir() / f"{name_or_path}.yaml"
    if not preset.is_file():
        names = list_presets()
        close = difflib.get_close_matches(str(name_or_path), names, n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown recipe {name_or_path!r}{hint} Presets: {', '.join(names) or '(none)'}; "
                       "or pass a path to a .yaml file")
    return loads_recipe(preset.read_text(), source=f"preset:{name_or_path}.yaml")
