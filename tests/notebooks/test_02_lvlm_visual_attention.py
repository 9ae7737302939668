"""notebooks/02: a tiny LLaVA's attention over COCO images, on the patch grid."""

from nbrun import execute


def test_notebook_02_runs_and_overlays_the_patch_grid(tmp_path, monkeypatch):
    run = execute("02_lvlm_visual_attention.ipynb", tmp_path, monkeypatch)
    s = run.summary
    assert s is not None, "the notebook's last cell prints a SUMMARY line"
    assert s["grid"] == [4, 4] and s["image_tokens"] == 16 and s["batch"] == 4
    assert all(0.0 < share <= 1.0 for share in s["image_share_last_layer"])
    assert s["decode_calls"] == 4
    assert len(run.pngs) == 3 and not run.figure_reprs
