"""Recycled Attention / RefreshKV: the worked example, and generation equal to a literal reference."""

import torch

from decode_reference import attnkit_run, recycled_ref, reference_run
from attnkit.interventions.kvcache.recycled import Recycled, pooled_group_scores, query_similarity, recycle_step, \
    recycled_cache
from attnkit.testing import tiny_causal_lm

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29]])


def test_worked_example():
    a = torch.tensor([[.40, .02, .05, .20, .03, .10, .05, .15], [.10, .30, .05, .05, .25, .05, .05, .15]])[None]
    pooled = pooled_group_scores(a, group=2, kernel=1)  # [1, 1, 8]
    assert torch.allclose(pooled.flatten(), torch.tensor([.40, .30, .05, .20, .25, .10, .05, .15]))
    cache = recycled_cache(pooled, torch.ones(1, 8, dtype=torch.bool), 3)
    assert cache.tolist() == [[[4, 1, 0]]]
    cache = recycle_step(cache, 8)
    assert cache.tolist() == [[[1, 0, 8]]]
    assert recycle_step(cache, 9).tolist() == [[[0, 8, 9]]]
    sim = query_similarity(torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.2, 0.8]]))
    assert abs(float(sim) - 0.98198) < 1e-5 and float(sim) >= 0.85


def test_pooling_kernel_and_padding():
    a = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])[None]
    assert pooled_group_scores(a, 1, 3).flatten().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    real = torch.tensor([[False, True, True, True, True]])
    cache = recycled_cache(torch.tensor([[[9.0, 1.0, 2.0, 3.0, 0.5]]]), real, 2)
    assert cache.tolist() == [[[2, 3]]]  # the padding slot 0 never enters the cache


def test_generation_equals_the_literal_reference():
    model = tiny_causal_lm("llama", num_hidden_layers=2)
    for stride, sim in ((2, 0.85), (2, 1.01), (100, 0.0)):  # some, every and no refresh at the checks
        want, seq = reference_run(model, IDS, recycled_ref(4, stride, sim, 3, 2), 6)
        for backend in ("torch", "eager"):
            rec = Recycled(budget=4, stride=stride, similarity=sim, kernel=3)
            got, got_seq = attnkit_run(model, IDS, rec, 6, backend)
            assert torch.allclose(got, want, atol=1e-4), (stride, sim, backend, (got - want).abs().max())
        if sim > 1:
            assert rec.full_steps == 2 * 2  # steps 2 and 4, on both layers
        if stride == 100:
            assert rec.full_steps == 0


def test_budget_fraction_and_fixed_schedule():
    model = tiny_causal_lm("llama")
    rec = Recycled(budget=0.25, stride=2, schedule="fixed", kernel=1)
    attnkit_run(model, IDS, rec, 4)  # budget round(14/4) = 4 slots; steps 1..3, step 2 is full
    assert rec.full_steps == 2  # one per layer
    assert abs(rec.account.fraction() - (5 + 16 + 5) / (15 + 16 + 17)) < 1e-9
