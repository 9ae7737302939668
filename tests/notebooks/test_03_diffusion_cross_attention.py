"""notebooks/03: tiny SD cross-attention maps, PAG and prompt-to-prompt."""

from nbrun import execute


def test_notebook_03_runs_and_shows_the_interventions_mechanics(tmp_path, monkeypatch):
    run = execute("03_diffusion_cross_attention.ipynb", tmp_path, monkeypatch)
    s = run.summary
    assert s is not None, "the notebook's last cell prints a SUMMARY line"
    assert s["steps"] == 10 and s["tokens"] == 8 and s["cross_layers"] == [1, 3, 5, 7]
    assert s["pag_calls"] == 10
    assert s["p2p_gap_early"] < 1e-6 < s["plain_gap_early"]  # the target reuses the source's maps
    assert len(run.pngs) == 7 and not run.figure_reprs
