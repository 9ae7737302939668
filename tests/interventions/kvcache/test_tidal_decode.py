"""TidalDecode: the worked example, and generation equal to a literal reference of the released rule."""

import torch

from decode_reference import attnkit_run, reference_run, tidal_ref
from attnkit.interventions.kvcache._sparse import masked_softmax
from attnkit.interventions.kvcache.tidal_decode import TidalDecode, tidal_select
from attnkit.testing import tiny_causal_lm

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25]])


def test_worked_example():
    scores = torch.tensor([2.0, 0.5, 1.5, -1.0]).view(1, 1, 1, 4)
    everything = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    keep = tidal_select(scores, everything, 2)
    assert keep.flatten().tolist() == [True, False, True, False]
    full = masked_softmax(scores, everything).flatten()
    assert torch.allclose(full, torch.tensor([0.5321, 0.1187, 0.3227, 0.0265]), atol=1e-4)
    after = masked_softmax(scores, keep).flatten()
    assert torch.allclose(after, torch.tensor([0.6225, 0.0, 0.3775, 0.0]), atol=1e-4)


def test_top_k_skips_masked_keys():
    scores = torch.tensor([5.0, 0.0, 1.0, 9.0]).view(1, 1, 1, 4)
    allowed = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)  # key 3 is padding
    assert tidal_select(scores, allowed, 2).flatten().tolist() == [True, False, True, False]


def test_generation_equals_the_literal_reference():
    model = tiny_causal_lm("llama", num_hidden_layers=4)
    for start, corr in ((1, 2), (0, 3)):
        want, seq = reference_run(model, IDS, tidal_ref(3, start, corr), 4)
        for backend in ("torch", "eager"):
            got, got_seq = attnkit_run(model, IDS, TidalDecode(top_k=3, sparse_layer_start=start,
                                                               correction_layer=corr), 4, backend)
            assert torch.allclose(got, want, atol=1e-4), (start, corr, backend, (got - want).abs().max())
            assert torch.equal(got_seq, seq)
    stock, _ = reference_run(model, IDS, tidal_ref(100, 9, 9), 4)
    assert not torch.allclose(want, stock, atol=1e-3)  # the method changes decode steps


def test_account_counts_selected_keys():
    model = tiny_causal_lm("llama", num_hidden_layers=3)
    tidal = TidalDecode(top_k=3, sparse_layer_start=0, correction_layer=2)
    attnkit_run(model, IDS, tidal, 3)
    summary = tidal.account.summary()
    assert summary["per_layer"][0] == 1.0 and summary["per_layer"][2] == 1.0  # selection layers attend fully
    assert abs(summary["per_layer"][1] - 6 / (13 + 14)) < 1e-9  # 3 keys of 13, then 3 of 14
    assert summary["steps"] == 2
