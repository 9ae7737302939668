"""LongHeads: the worked example (chunk choice, gathered positions), and decoding equal to a literal reference that
rotates un-rotated q/k itself (local chunk positions for the summaries, compacted positions for attention)."""

import pytest
import torch

import attnkit
from decode_reference import attnkit_run, long_heads_ref, reference_run
from attnkit.interventions.kvcache.long_heads import LongHeads, select_chunks
from attnkit.testing import tiny_causal_lm

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37]])


def test_worked_example_chunks_and_positions():
    chosen = select_chunks(torch.tensor([[0.2, 0.9, 0.1]]), 5, True, 4)  # w=2, k_c=4, N=11
    assert chosen.tolist() == [[0, 2, 4, 5]]
    w, n = 2, 11
    tokens = torch.cat([torch.arange(c * w, min((c + 1) * w, n)) for c in chosen[0].tolist()])
    assert tokens.tolist() == [0, 1, 4, 5, 8, 9, 10]  # gathered at positions 0..6, the query (token 10) at 6
    assert (4 - 1) * w + n % w == 7  # R
    assert select_chunks(torch.tensor([[0.2, 0.9, 0.1]]), 6, False, 4).tolist() == [[0, 2, 5]]  # N = 12


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generation_equals_the_literal_reference(family):
    model = tiny_causal_lm(family)
    rotary = model.model.rotary_emb
    for w, length in ((2, 8), (3, 12)):
        want, seq = reference_run(model, IDS, long_heads_ref(rotary, w, length // w), 5, raw_rope=True)
        got, got_seq = attnkit_run(model, IDS, LongHeads(window_size=w, atten_length=length,
                                                         begin_selective_length=64), 5)
        assert torch.allclose(got, want, atol=1e-4), (w, (got - want).abs().max())
        assert torch.equal(got_seq, seq)


def test_account_and_original_positions_and_refusals():
    model = tiny_causal_lm("llama")
    lh = LongHeads(window_size=2, atten_length=8, begin_selective_length=64)
    attnkit_run(model, IDS, lh, 3)  # N = 19, 20: 7 kept (3 chunks + partial), then 6 (3 chunks)
    assert lh.account.summary()["mean_keys"] == (7 + 6) / 2
    original, _ = attnkit_run(model, IDS, LongHeads(window_size=2, atten_length=8, begin_selective_length=64,
                                                    positions="original"), 3)
    compact, _ = attnkit_run(model, IDS, LongHeads(window_size=2, atten_length=8, begin_selective_length=64), 3)
    assert not torch.allclose(original, compact, atol=1e-4)
    with pytest.raises(ValueError, match="at least 4"):
        LongHeads(window_size=4, atten_length=8)
    with attnkit.attach(model, [LongHeads(window_size=2, atten_length=8, begin_selective_length=8)]):
        with pytest.raises(ValueError, match="begin_selective_length"):
            model(IDS)
