"""Task registry: every ``attnkit/eval/tasks/*.yaml`` is registered by its ``name`` in an
:class:`attnkit.registry.Registry` (the one registry implementation, "did you mean" included).

A task file has the keys ``name``, ``class`` (``package.module:TaskClass``), ``description``, ``params`` and
``include``. ``include: other.yaml`` (relative to the including file) starts from that file's ``class``,
``description`` and ``params`` and applies this file's on top, so variants need no copies
(``pope_popular.yaml`` is ``include: pope_random.yaml`` + ``params: {split: popular}``). Files whose name starts
with ``_`` are include-only and not registered. Unknown keys, unknown parameters and wrong types are errors that
name the file and line (``params`` are checked against the class's ``params_spec``).

Example:
    >>> "truthfulqa_mc" in list_tasks()
    True
    >>> get_task("pope_popular").params["split"]
    'popular'
    >>> get_task("truthfulqa_mcc")
    Traceback (most recent call last):
    ...
    attnkit.eval.errors.UnknownTaskError: unknown eval task 'truthfulqa_mcc'; did you mean 'truthfulqa_mc'? Known: chair, cost, niah, pope_adversarial, pope_popular, pope_random, truthfulqa_mc, wikitext2_ppl, wikitext2_streaming
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from attnkit.eval.errors import EvalError, UnknownTaskError
from attnkit.eval.params import did_you_mean
from attnkit.eval.task import Task
from attnkit.registry import Registry

TASK_DIR = Path(__file__).parent / "tasks"
TOP_KEYS = ("name", "class", "description", "params", "include")
TASKS = Registry("eval task")  # name -> path of its YAML file
_LOADED = False


def _line_map(node, path=()) -> dict:
    """``{key path: 1-based line}`` for the mappings of a composed YAML node."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines[path + (key.value,)] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                lines.update(_line_map(value, path + (key.value,)))
    return lines


def _read(path: Path, seen: tuple = ()) -> tuple[dict, dict]:
    """The task spec of one file with its includes merged, and the line of every field (for errors)."""
    if path in seen:
        raise EvalError(f"{path}: include: the files include each other ({' -> '.join(map(str, seen + (path,)))}).")
    try:
        text = path.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        spec = yaml.safe_load(text)
    except OSError as err:
        raise EvalError(f"task file {path} cannot be read ({err.strerror}); check the path.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise EvalError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML: {getattr(err, 'problem', err)}.") \
            from None
    if not isinstance(spec, dict):
        raise EvalError(f"{path}: a task file is a mapping with keys {', '.join(TOP_KEYS)}, got "
                        f"{type(spec).__name__}.")
    lines = _line_map(node)
    for key in spec:
        if key not in TOP_KEYS:
            raise EvalError(f"{path}:{lines.get((key,), 1)}: unknown key {key!r}{did_you_mean(key, TOP_KEYS)} "
                            f"(allowed: {', '.join(TOP_KEYS)}).")
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise EvalError(f"{path}:{lines.get(('params',), 1)}: params must be a mapping of parameter: value, got "
                        f"{params!r}.")
    merged: dict = {"params": {}}
    if "include" in spec:
        base_path = (path.parent / str(spec["include"])).resolve()
        if not base_path.is_file():
            raise EvalError(f"{path}:{lines.get(('include',), 1)}: include: {spec['include']!r} is not a file next "
                            f"to {path.name}; give a path relative to it.")
        merged, _ = _read(base_path, seen + (path,))
        merged.pop("name", None)
    merged.update({k: v for k, v in spec.items() if k not in ("params", "include")})
    merged["params"] = {**merged["params"], **params}
    merged["path"] = str(path)
    return merged, lines


def _load(path: Path) -> dict:
    """A checked task spec: required fields present, class importable, params valid (with file:line)."""
    spec, lines = _read(path)
    for field in ("name", "class"):
        if field not in spec:
            raise EvalError(f"{path}: missing field {field!r} (e.g. `class: package.module:TaskClass`); add it or "
                            f"`include:` a file that has it.")
    cls = _import_class(spec["class"], f"{path}:{lines.get(('class',), 1)}")
    spec["params"] = cls.check_params(spec["params"], str(path), lines)
    spec["cls"] = cls
    return spec


def register_task_file(path: str | Path) -> str:
    """Register one YAML task file; returns its name (a name may be registered by one file only)."""
    path = Path(path).resolve()
    name = _load(path)["name"]
    if name in TASKS and TASKS.get(name) != str(path):
        raise EvalError(f"{path}: task name {name!r} is already registered by {TASKS.get(name)}; rename it.")
    if name not in TASKS:
        TASKS.register(name, str(path))
    return name


def _ensure_loaded() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for path in sorted(TASK_DIR.glob("*.yaml")):
            if not path.name.startswith("_"):
                register_task_file(path)


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    _ensure_loaded()
    return TASKS.names()


def _import_class(ref, where: str):
    module, _, attr = str(ref).partition(":")
    if not attr:
        raise EvalError(f"{where}: class {ref!r} must look like 'package.module:ClassName'.")
    try:
        cls = getattr(importlib.import_module(module), attr, None)
    except ImportError as err:
        raise EvalError(f"{where}: class {ref!r}: module {module!r} cannot be imported ({err}).") from None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Task)):
        raise EvalError(f"{where}: {ref!r} is not a Task subclass.")
    return cls


def task_spec(name: str) -> dict:
    """The checked spec of a registered task name or a task YAML path (``name``, ``cls``, ``params``, …)."""
    _ensure_loaded()
    if str(name).endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise EvalError(f"task file {name} does not exist; give a registered task name or a YAML path.")
        return _load(Path(name).resolve())
    try:
        return _load(Path(TASKS.get(name)))
    except KeyError as err:
        raise UnknownTaskError(str(err.args[0])) from None


def get_task(name: str, **overrides) -> Task:
    """Instantiate a task by registered name (or by YAML path), with ``params`` overridden by ``overrides``
    (checked against the task's parameters: unknown keys and wrong types raise :class:`EvalError`)."""
    spec = task_spec(name)
    cls = spec["cls"]
    cls.check_params(overrides, f"task {spec['name']!r} (override)")
    task = cls(spec["name"], **{**spec["params"], **overrides})
    task.description = spec.get("description", "") or ""
    return task
