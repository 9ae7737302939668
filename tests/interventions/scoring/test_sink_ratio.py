"""Attention-sink ratio: the worked example, and α(k) equal to the one computed from transformers' own eager
attention weights; SmolLM2 has sinks on natural text."""

import pytest
import torch

from attnkit.interventions.scoring.sink_ratio import key_importance, ratio_of, sink_ratio
from attnkit.testing import tiny_causal_lm


def test_worked_example():
    A = torch.tensor([[1, 0, 0, 0], [.7, .3, 0, 0], [.6, .2, .2, 0], [.5, .1, .1, .3]])
    alpha = key_importance(A)
    assert torch.allclose(alpha, torch.tensor([0.7, 0.2, 0.15, 0.3]))
    assert ratio_of(alpha[None], 0.3, 0) == 100.0
    assert ratio_of(alpha[None], 0.3, 3) == 0.0  # 0.3 is not > 0.3
    assert ratio_of(torch.stack([alpha, torch.tensor([0.25, 0.3, 0.2, 0.1])]), 0.3, 0) == 50.0


def test_alpha_equals_transformers_eager_attentions():
    model = tiny_causal_lm("qwen2", attn_implementation="eager")
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    res = sink_ratio(model, ids, T=8, eps=0.1)
    with torch.no_grad():
        attentions = model(ids[:, :8], output_attentions=True).attentions  # per layer [S, H, T, T]
    want = torch.stack([key_importance(a) for a in attentions], 1)
    assert torch.allclose(res.alpha, want, atol=1e-5)
    assert res.ratio == ratio_of(want, 0.1, 0) and res.at(2, 0.05) == ratio_of(want, 0.05, 2)
    assert res.scores.scores.shape == (2, 4)
    with pytest.raises(ValueError, match="at least T=64"):
        sink_ratio(model, ids)


def test_smollm2_has_first_token_sinks(smollm2):
    model, tok = smollm2
    from attnkit.eval.metrics.niah import essay_text

    text = essay_text()[:4000]
    ids = tok(text, return_tensors="pt")["input_ids"][:, :256].view(4, 64)
    res = sink_ratio(model, ids, data="Paul Graham essays, 4 x 64 tokens")
    assert res.ratio > 20.0  # many heads put > 0.3 of their mass on the first token
    assert res.at(5) < res.ratio  # far fewer on a later token
