"""Task registry: every ``attnkit/eval/tasks/*.yaml`` is registered by its ``name``; wrong names get suggestions.

Example:
    >>> "truthfulqa_mc" in list_tasks()
    True
    >>> get_task("truthfulqa_mcc")
    Traceback (most recent call last):
    ...
    KeyError: "Unknown eval task 'truthfulqa_mcc'. Did you mean 'truthfulqa_mc'? ..."
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

import yaml

from attnkit.eval.task import Task

TASK_DIR = Path(__file__).parent / "tasks"
_REGISTRY: dict[str, dict] = {}
_LOADED = False


def _read_yaml(path: Path) -> dict:
    with open(path) as fh:
        spec = yaml.safe_load(fh)
    if not isinstance(spec, dict):
        raise ValueError(f"task file {path}: expected a mapping at top level, got {type(spec).__name__}.")
    for field in ("name", "class"):
        if field not in spec:
            raise ValueError(f"task file {path}: missing field {field!r} (e.g. `class: module.path:ClassName`).")
    spec.setdefault("params", {})
    if not isinstance(spec["params"], dict):
        raise ValueError(f"task file {path}: `params` must be a mapping, got {spec['params']!r}.")
    spec["path"] = str(path)
    return spec


def register_task_file(path: str | Path) -> str:
    """Register one YAML task file; returns its name. Re-registering a name replaces it."""
    spec = _read_yaml(Path(path))
    _REGISTRY[spec["name"]] = spec
    return spec["name"]


def _ensure_loaded() -> None:
    global _LOADED
    if not _LOADED:
        for path in sorted(TASK_DIR.glob("*.yaml")):
            spec = _read_yaml(path)
            _REGISTRY.setdefault(spec["name"], spec)
        _LOADED = True


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def _import_class(ref: str, where: str):
    module, _, attr = ref.partition(":")
    if not attr:
        raise ValueError(f"{where}: class {ref!r} must look like 'package.module:ClassName'.")
    cls = getattr(importlib.import_module(module), attr, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"{where}: {ref!r} is not a Task subclass.")
    return cls


def get_task(name: str, **overrides) -> Task:
    """Instantiate a task by registered name (or by YAML path), with ``params`` overridden by ``overrides``."""
    _ensure_loaded()
    if name.endswith((".yaml", ".yml")) and Path(name).exists():
        name = register_task_file(name)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"Unknown eval task {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}.")
    spec = _REGISTRY[name]
    cls = _import_class(spec["class"], spec["path"])
    params = {**spec["params"], **overrides}
    task = cls(name, **params)
    task.description = spec.get("description", "")
    return task
