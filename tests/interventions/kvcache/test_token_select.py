"""TokenSelect: the worked example, and generation (chunked prefill + decode, compacted positions) equal to a
literal reference that rotates un-rotated q/k itself."""

import pytest
import torch

import attnkit
from decode_reference import attnkit_run, reference_run, token_select_ref
from attnkit.interventions.kvcache.token_select import TokenSelect, pick_tokens, soft_votes
from attnkit.testing import tiny_causal_lm

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33]])


def test_worked_example_soft_votes_beat_raw_sums():
    keys = torch.eye(4).view(1, 4, 4).expand(2, 4, 4)  # unit keys: q·k_j is the j-th entry of q
    q = torch.tensor([[3.0, 2.9, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    votes = soft_votes(q, keys)
    assert torch.allclose(votes, torch.tensor([0.5952, 0.5477, 0.7361, 0.1211]), atol=1e-4)
    assert pick_tokens(votes, 2).tolist() == [0, 2]
    assert pick_tokens(q.sum(0), 2).tolist() == [0, 1]  # summing raw scores would pick {0, 1}


def test_gqa_head_maps():
    keys = torch.stack([torch.eye(3), torch.eye(3).flip(0)])  # KV head 0: identity, KV head 1: reversed
    q = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 0, 0], [0, 0, 0]])  # heads 0, 1 vote; H=4, Hkv=2
    group = soft_votes(q, keys, "group")  # heads 0, 1 read KV head 0 -> key 0
    modulo = soft_votes(q, keys, "modulo")  # head 1 reads KV head 1 -> key 2
    assert int(group.argmax()) == 0 and modulo[2] > group[2]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generation_equals_the_literal_reference(family):
    model = tiny_causal_lm(family)
    rotary = model.model.rotary_emb
    for kw in (dict(n_init=1, n_local=4, top_k=3, prefill_chunk=4), dict(n_init=2, n_local=3, top_k=5,
                                                                           prefill_chunk=2)):
        want, seq = reference_run(model, IDS, token_select_ref(rotary, kw["n_init"], kw["n_local"], kw["top_k"],
                                                               kw["prefill_chunk"]), 4, raw_rope=True)
        got, got_seq = attnkit_run(model, IDS, TokenSelect(**kw), 4)
        assert torch.allclose(got, want, atol=1e-4), (kw, (got - want).abs().max())
        assert torch.equal(got_seq, seq)


def test_full_attention_when_everything_fits_and_original_positions_differ():
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        stock = model(IDS).logits
        with attnkit.attach(model, [TokenSelect(n_init=4, n_local=8, top_k=8, prefill_chunk=8)]):
            same = model(IDS).logits
        with attnkit.attach(model, [TokenSelect(n_init=1, n_local=2, top_k=2, prefill_chunk=2)]):
            compact = model(IDS).logits
        with attnkit.attach(model, [TokenSelect(n_init=1, n_local=2, top_k=2, prefill_chunk=2,
                                                positions="original")]):
            original = model(IDS).logits
    assert torch.allclose(same, stock, atol=1e-5)
    assert not torch.allclose(compact, stock, atol=1e-3) and not torch.allclose(compact, original, atol=1e-4)


def test_refusals():
    with pytest.raises(ValueError, match="n_local"):
        TokenSelect(n_local=4, prefill_chunk=8)
    with pytest.raises(ValueError, match="positions"):
        TokenSelect(positions="compacted")
    with pytest.raises(attnkit.AttachError, match="mrope"):
        from attnkit.testing import tiny_vlm

        attnkit.attach(tiny_vlm("qwen2_vl"), [TokenSelect()])
