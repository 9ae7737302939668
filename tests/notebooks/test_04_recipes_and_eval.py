"""notebooks/04: two presets on the real SmolLM2 and the eval harness's report."""

import pytest

from nbrun import execute


@pytest.mark.slow
def test_notebook_04_runs_and_reports(tmp_path, monkeypatch):
    run = execute("04_recipes_and_eval.ipynb", tmp_path, monkeypatch)
    s = run.summary
    assert s is not None, "the notebook's last cell prints a SUMMARY line"
    assert s["n_paired"] == 2 and set(s["ppl"]) == {"baseline", "act-llama", "head-temperature-64"}
    assert s["baseline_answer"].startswith("Paris")
    assert s["other_sinks_act"] < s["other_sinks_base"]
    assert "| arm | ppl |" in run.markdown  # the report table is displayed
    assert len(run.pngs) == 2 and not run.figure_reprs
