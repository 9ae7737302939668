"""The runnable examples in the docstrings of the recipe, CLI, model-loading, report and demo modules stay true."""

import doctest
import importlib

import pytest

MODULES = [
    "attnkit.recipes", "attnkit.recipes.loader", "attnkit.recipes.schema", "attnkit.recipes.needs", "attnkit.cli",
    "attnkit.models", "attnkit.report", "attnkit.demo", "attnkit.interventions", "attnkit.registry",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # models' example resolves an uncached hub name offline
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and (result.attempted > 0 or name == "attnkit.recipes.schema")
