"""Notebooks are committed without outputs and with the standard kernel name; the list of notebooks is the one the
execution tests cover."""

import nbformat
import pytest

from nbrun import NOTEBOOKS

EXECUTED_BY_TESTS = {"01_sinks_and_head_scores.ipynb", "02_lvlm_visual_attention.ipynb",
                     "03_diffusion_cross_attention.ipynb", "04_recipes_and_eval.ipynb", "05_diffusion_editing.ipynb"}


def test_every_notebook_has_an_execution_test():
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == EXECUTED_BY_TESTS


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_outputs_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: strip them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
