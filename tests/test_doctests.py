"""Every public module's docstring examples run (examples marked +SKIP need real weights, a GPU or the network)."""

import doctest
import importlib
import pkgutil

import pytest

import attnkit

#: modules that need an optional extra: skipped when it is not installed
OPTIONAL = {"attnkit.eval.lm_eval_plugin": "lm_eval", "attnkit.kernels.triton._flash": "triton"}
#: entry points, not libraries: importing them runs a program
SCRIPTS = {"attnkit.eval.__main__", "attnkit.__main__"}

MODULES = ["attnkit"] + sorted(m.name for m in pkgutil.walk_packages(attnkit.__path__, "attnkit.")
                               if m.name not in SCRIPTS)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
