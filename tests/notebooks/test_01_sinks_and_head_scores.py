"""notebooks/01: the real SmolLM2's attention sink, head scores and maps."""

import pytest

from nbrun import execute


@pytest.mark.slow
def test_notebook_01_runs_and_finds_the_sink(tmp_path, monkeypatch):
    run = execute("01_sinks_and_head_scores.ipynb", tmp_path, monkeypatch)
    s = run.summary
    assert s is not None, "the notebook's last cell prints a SUMMARY line"
    assert (s["layers"], s["heads"]) == (30, 9)
    assert s["sink_mass_late"] > 0.3  # first-token mass, layers 12-29 of the real weights
    assert 0 <= s["top_sink_head"][0] < 30 and 0 <= s["top_prev_head"][1] < 9
    assert len(run.pngs) == 5 and not run.figure_reprs  # every figure rendered as an image
