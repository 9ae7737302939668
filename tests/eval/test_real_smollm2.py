"""End-to-end on the real SmolLM2-135M-Instruct (loaded once): TruthfulQA subset, perplexity (strided and
streaming), NIAH small grid, cost. Small sizes; the numbers themselves are not asserted beyond sanity."""

import math

import pytest
import torch

from attnkit.eval import get_task, read_records, run_eval
from attnkit.eval.loglik import loglikelihood
from attnkit.eval.metrics import perplexity as ppl
from attnkit.eval.runner import null_arm
from eval_arms import bias_arm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2):
    """The session-wide SmolLM2 of tests/conftest.py (our code pads by itself; padding_side is irrelevant)."""
    return smollm2


def test_loglik_real_model(smol):
    model, tok = smol
    pairs = [("The capital of France is", " Paris"), ("The capital of France is", " London"),
             ("Q: What color is the sky?\nA:", " Blue.")]
    right = loglikelihood(model, tok, pairs, batch_size=3)
    left = loglikelihood(model, tok, pairs, batch_size=3, padding_side="left")
    single = [loglikelihood(model, tok, [p], batch_size=1)[0] for p in pairs]
    assert right[0] > right[1]
    assert right == pytest.approx(single, abs=2e-3) and left == pytest.approx(single, abs=2e-3)


def test_truthfulqa_run_real(smol, tmp_path):
    model, tok = smol
    rep = run_eval(model, tok, "truthfulqa_mc", {"baseline": null_arm, "bias": bias_arm}, limit=1,
                   out_dir=tmp_path, progress=False, n_boot=50, figures=False)
    assert rep["n_paired"] == 1 and 0.0 <= rep["arms"]["baseline"]["mc2"] <= 1.0
    assert rep["arms"]["bias"]["mc2"] != rep["arms"]["baseline"]["mc2"]


def test_perplexity_real(smol):
    model, tok = smol
    ids = ppl.wikitext_blocks(tok, block_tokens=48)[0]
    strided, n = ppl.strided_nll(model, ids, max_length=48)
    dense, n2 = ppl.streaming_nll(model, ids)
    assert n == n2 == 47 and dense == pytest.approx(strided, rel=1e-3)
    assert 1.0 < ppl.perplexity(strided, n) < 500.0
    sw, _ = ppl.streaming_nll(model, ids, ppl.SinkWindowPolicy(sink=4, window=12))
    assert math.isfinite(sw) and sw != pytest.approx(dense, rel=1e-6)


def test_niah_small_grid_real(smol, tmp_path):
    model, tok = smol
    task = get_task("niah", context_lengths=[256], depths=[0, 100], buffer=40, max_new_tokens=20)
    rep = run_eval(model, tok, task, {"baseline": null_arm}, out_dir=tmp_path, progress=False, n_boot=20)
    assert rep["n_paired"] == 2 and 0.0 <= rep["arms"]["baseline"]["score"] <= 100.0
    assert (tmp_path / "niah_heatmap_baseline.png").exists()


def test_cost_real(smol):
    model, tok = smol
    task = get_task("cost", prompt_lengths=[32], new_tokens=4, repeats=1)
    rec = task.run_example(model, tok, task.examples(tok)[0])
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert rec["kv_cache_bytes"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (32 + 4 - 1) * head_dim * 4
    assert rec["tokens_per_s"] > 0 and rec["prefill_s"] > 0


def _tiny_truthfulqa(path, n_questions=1, n_answers=2):
    """The first TruthfulQA rows, each cut to ``n_answers`` correct and incorrect answers (a fast real subset)."""
    import csv

    from attnkit.data import data_path

    with open(data_path("truthfulqa", "TruthfulQA.csv"), newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [row for _, row in zip(range(n_questions), reader)]
        fields = reader.fieldnames
    for row in rows:
        for col in ("Correct Answers", "Incorrect Answers"):
            row[col] = "; ".join(row[col].split(";")[:n_answers])
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_recipe_arms_through_attach(smol, tmp_path):
    """Arms given as preset names go through attnkit.attach: noop reproduces the baseline bit for bit,
    act-llama changes every log-likelihood, and the report carries paired deltas with CIs."""
    model, tok = smol
    task = get_task("truthfulqa_mc", path=str(_tiny_truthfulqa(tmp_path / "tqa.csv")), batch_size=8)
    rep = run_eval(model, tok, task, ["baseline", "noop", "act-llama"], out_dir=tmp_path / "run",
                   progress=False, n_boot=50, figures=False)
    recs = {(r["arm"], r["id"]): r for r in read_records(tmp_path / "run")}
    assert rep["n_paired"] == 1 and set(rep["deltas"]) == {"noop", "act-llama"}
    assert recs[("noop", "0")]["lls"] == recs[("baseline", "0")]["lls"]  # exact, not approx
    assert all(d == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0} for d in rep["deltas"]["noop"].values())
    act, base = recs[("act-llama", "0")]["lls"], recs[("baseline", "0")]["lls"]
    assert all(a != pytest.approx(b, abs=1e-4) for a, b in zip(act, base))
    d = rep["deltas"]["act-llama"]["mc2"]
    assert d["delta"] != 0.0 and d["ci_low"] <= d["delta"] <= d["ci_high"]
    assert "| act-llama |" in (tmp_path / "run" / "report.md").read_text()
    # the handle is removed after its arm: the stock model again
    assert task.run_example(model, tok, task.examples()[0])["lls"] == recs[("baseline", "0")]["lls"]
