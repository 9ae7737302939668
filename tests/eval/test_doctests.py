"""Every docstring example in attnkit.eval runs (examples marked +SKIP need real weights or the network)."""

import doctest
import importlib
import pkgutil

import pytest

import attnkit.eval

MODULES = ["attnkit.eval"] + [m.name for m in pkgutil.walk_packages(attnkit.eval.__path__, "attnkit.eval.")
                              if m.name != "attnkit.eval.__main__"]


OPTIONAL = {"attnkit.eval.lm_eval_plugin": "lm_eval"}  # modules of optional extras: skipped when not installed


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0
