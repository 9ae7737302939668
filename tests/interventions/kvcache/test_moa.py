"""MoA-style per-head spans: masks by hand, elastic spans per sample, decoding equal to a literal reference, and
spans from head scores keeping the budget."""

import pytest
import torch

import attnkit
from decode_reference import _attend, _causal, attnkit_run, expand, reference_run
from attnkit.interventions.kvcache.moa import MoA, span_keep, spans_from_scores
from attnkit.scores import HeadScores
from attnkit.testing import tiny_causal_lm

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 21]])


def test_masks_by_hand():
    keep = span_keep(torch.ones(1, 6, dtype=torch.bool), 1, torch.tensor([2.0, 3.5, float("inf")]), 1)
    assert keep[0, :, 0].int().tolist() == [[1, 0, 0, 0, 1, 1], [1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    padded = torch.tensor([[False, False, True, True, True, True]])
    assert span_keep(padded, 1, torch.tensor([2.0]), 1)[0, 0, 0].int().tolist() == [0, 0, 1, 0, 1, 1]


def moa_ref(windows, sinks):
    def fn(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        H, Q, K = q.shape[1], q.shape[2], k.shape[2]
        allowed = _causal(Q, K).expand(1, H, Q, K).clone()
        if Q < K:
            for h, w in enumerate(windows.get(module.layer_idx, [])):
                if w is not None:
                    keep = torch.zeros(K, dtype=torch.bool)
                    keep[:sinks] = True
                    keep[max(0, K - w):] = True  # i - j < w for the query at K - 1
                    allowed[0, h, 0] &= keep
        return _attend(q, expand(k, H), expand(v, H), allowed, scaling), None

    return fn


def test_decoding_equals_the_literal_reference_and_elastic_spans():
    model = tiny_causal_lm("llama")
    windows = {0: [2, None, 3, 5], 1: [None, 4]}
    want, _ = reference_run(model, IDS, moa_ref(windows, 1), 4)
    got, _ = attnkit_run(model, IDS, MoA(windows=windows, sinks=1), 4)
    assert torch.allclose(got, want, atol=1e-4)
    # alpha + beta N: 1 + 0.25 N with N = 11, 12, 13 → 3.75, 4, 4.25 → windows 4, 4, 5 keys... equal to fixed 4/4/5
    moa = MoA(spans={0: [(1.0, 0.25)]}, sinks=0)
    attnkit_run(model, IDS, moa, 3)
    assert moa.account.attended[0] == pytest.approx(4 + 4)  # steps at N = 11 (3.75 → 4 keys) and 12 (4)


def test_spans_from_scores_keep_the_budget():
    scores = HeadScores(torch.tensor([[4.0, 0.0], [2.0, 2.0]]))
    windows = spans_from_scores(scores, budget=100.0, min_span=10.0)
    flat = [w for layer in windows.values() for w in layer]
    assert abs(sum(flat) / 4 - 100.0) < 1e-4 and windows[0][0] > windows[1][0] > windows[0][1]
    with pytest.raises(ValueError, match="exactly one"):
        MoA()
    with pytest.raises(attnkit.AttachError, match="layer 7"):
        attnkit.attach(tiny_causal_lm("llama"), [MoA(windows={7: [3]})])
