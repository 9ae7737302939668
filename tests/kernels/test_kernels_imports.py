"""Kernels are a leaf: they never import interventions, the attach API or the model hooks; their modules import each
other without cycles; backend names are declared once (kernels/backends.py).

Before the clean-up, eager.py and torch_path.py imported ``key_group_ids`` from the interventions, grouped.py and
the triton package imported each other, and backend names were spelled out in four places.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import attnkit.kernels

KERNELS = Path(attnkit.kernels.__file__).resolve().parent
PACKAGE = KERNELS.parent
FORBIDDEN = ("attnkit.interventions", "attnkit.api", "attnkit.hooks")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


KERNEL_MODULES = sorted(module_name(p) for p in KERNELS.rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_every_kernel_module_is_found():
    assert {"attnkit.kernels.masks", "attnkit.kernels.grouped", "attnkit.kernels.triton._flash"} <= set(KERNEL_MODULES)


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernel_module_imports_nothing_above_the_kernels_at_runtime(module):
    """Import the module with ``attnkit/__init__`` bypassed, then look at what got imported."""
    code = (
        "import importlib, sys, types\n"
        f"pkg = types.ModuleType('attnkit'); pkg.__path__ = [{str(PACKAGE)!r}]; sys.modules['attnkit'] = pkg\n"
        f"importlib.import_module({module!r})\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r}))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, f"{module} imported {result.stdout.strip()} {result.stderr[-2000:]}"


@pytest.mark.parametrize("path", sorted(KERNELS.rglob("*.py")), ids=lambda p: p.name)
def test_kernel_source_never_imports_interventions_api_or_hooks(path):
    """Also lazy (function-level) imports, which a runtime import does not execute."""
    bad = sorted(name for name in imports_of(path) if name.startswith(FORBIDDEN))
    assert bad == [], f"{path.name} imports {bad}"


def test_no_import_cycles_between_kernel_modules():
    graph = {}
    for path in KERNELS.rglob("*.py"):
        mod = module_name(path)
        graph[mod] = {m for m in KERNEL_MODULES if m != mod and any(i == m or i.startswith(m + ".")
                                                                  for i in imports_of(path))}
        graph[mod] -= {"attnkit.kernels"}  # the empty package __init__
    state: dict[str, int] = {}

    def visit(mod, stack):
        state[mod] = 1
        for dep in graph.get(mod, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [mod, dep]))
            if dep not in state:
                visit(dep, stack + [mod])
        state[mod] = 2

    for mod in graph:
        if mod not in state:
            visit(mod, [])


def test_backend_names_are_declared_only_in_kernels_backends():
    """No tuple, list or set literal outside kernels/backends.py spells out several backend names."""
    from attnkit.kernels.backends import BACKEND_NAMES

    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == KERNELS / "backends.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = {e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in BACKEND_NAMES}
                if len(names) >= 2:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_auto_never_picks_a_backend_that_cannot_run_the_models_mask(monkeypatch):
    """Capability ``mask`` = runs any mask the model builds exactly; a backend without it is never chosen."""
    from dataclasses import replace

    from attnkit.kernels import backends

    maskless = replace(backends.BACKENDS.get("torch"), capabilities=backends.TORCH_CAPABILITIES - {"mask"})
    monkeypatch.setitem(backends.BACKENDS._items, "torch", maskless)
    assert backends.choose_backend("auto", {"group_factors": ["act"]}, "cpu").name == "eager"
    with pytest.raises(ValueError, match="attention mask needs 'mask'"):
        backends.choose_backend("torch", {"group_factors": ["act"]}, "cpu")
