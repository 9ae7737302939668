"""The runnable examples in the core modules' docstrings stay true."""

import doctest
import importlib

import pytest

MODULES = [
    "attnkit", "attnkit.api", "attnkit.registry", "attnkit.targets", "attnkit.spans", "attnkit.data",
    "attnkit.interventions.base", "attnkit.interventions.noop", "attnkit.kernels.masks", "attnkit.kernels.plan",
    "attnkit.kernels.eager", "attnkit.kernels.torch_path", "attnkit.kernels.backends", "attnkit.kernels.grouped",
    "attnkit.kernels.stats", "attnkit.testing",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
