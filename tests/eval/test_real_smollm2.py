"""End-to-end on the real SmolLM2-135M-Instruct (loaded once): TruthfulQA subset, perplexity (strided and
streaming), NIAH small grid, cost. Small sizes; the numbers themselves are not asserted beyond sanity."""

import math

import pytest
import torch

from attnkit.eval import get_task, run_eval
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
