"""notebooks/05: DDIM inversion, StyleID, MasaCtrl, FateZero and BroadWay on tiny pipelines, stored vs injected maps."""

from nbrun import execute


def test_notebook_05_runs_and_shows_stored_and_injected_maps(tmp_path, monkeypatch):
    run = execute("05_diffusion_editing.ipynb", tmp_path, monkeypatch)
    s = run.summary
    assert s is not None, "the notebook's last cell prints a SUMMARY line"
    assert s["exact_reconstruction_error"] < 1e-5
    assert s["styleid_injected_calls"] == (s["steps"] - 1) * s["styleid_layers"]
    assert s["masactrl_edited_calls"] > 0 and s["fatezero_fused_calls"] > 0 and s["video_store_mib"] > 0
    assert len(run.pngs) == 7 and not run.figure_reprs
