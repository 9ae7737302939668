"""Strided perplexity vs direct computation; streaming cache policies vs independent references."""

import pytest
import torch
from transformers import DynamicCache

from eval_fixtures import make_tiny_llama
from attnkit.eval.metrics import perplexity as ppl
from attnkit.hooks.compat import cache_kwargs


@pytest.fixture(scope="module")
def one_layer():
    return make_tiny_llama(vocab_size=50, layers=1, seed=1)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(0)
    return torch.randint(0, 50, (24,))


def _direct_nll(model, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0], -1)  # [N, V]
    return -sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)))


def test_strided_single_window_equals_direct(one_layer, ids):
    nll, n = ppl.strided_nll(one_layer, ids, max_length=64)
    assert n == len(ids) - 1 and nll == pytest.approx(_direct_nll(one_layer, ids), abs=1e-3)


def test_strided_bigram_context(one_layer, ids):
    nll, n = ppl.strided_nll(one_layer, ids, max_length=2, stride=1)
    ref = sum(_direct_nll(one_layer, ids[t - 1:t + 1]) for t in range(1, len(ids)))
    assert n == len(ids) - 1 and nll == pytest.approx(ref, abs=1e-3)


def test_strided_scores_every_token_once(one_layer, ids):
    for max_length, stride in [(8, 4), (8, 8), (10, 3)]:
        assert ppl.strided_nll(one_layer, ids, max_length, stride)[1] == len(ids) - 1
    with pytest.raises(ValueError, match="stride"):
        ppl.strided_nll(one_layer, ids, max_length=4, stride=5)
    assert ppl.perplexity(0.0, 0) == float("inf") and ppl.perplexity(2.0, 2) == pytest.approx(2.718281828)


def test_streaming_dense_equals_full_forward(tiny_llama):
    ids = torch.arange(3, 30)
    dense, n = ppl.streaming_nll(tiny_llama, ids)
    assert n == len(ids) - 1 and dense == pytest.approx(_direct_nll(tiny_llama, ids), abs=1e-3)
    big = ppl.streaming_nll(tiny_llama, ids, ppl.SinkWindowPolicy(4, 100))[0]  # never evicts
    assert big == pytest.approx(dense, abs=1e-5)


@pytest.mark.parametrize("sink,window,shift", [(2, 3, True), (2, 3, False), (0, 4, True), (1, 5, False)])
def test_streaming_matches_one_layer_recompute(one_layer, ids, sink, window, shift):
    """In a 1-layer model a cached K/V depends only on its token and position, so StreamingLLM equals a fresh
    forward over the kept tokens at slot positions (shift) or at their original positions (no shift)."""
    _, _, steps = ppl.streaming_nll(one_layer, ids, ppl.SinkWindowPolicy(sink, window, shift), return_steps=True)
    for t in range(len(ids) - 1):
        prev = list(range(t))
        kept = prev if len(prev) <= sink + window else prev[:sink] + prev[len(prev) - window:]
        seq = kept + [t]
        pos = list(range(len(seq))) if shift else seq
        with torch.no_grad():
            logits = one_layer(ids[seq][None], position_ids=torch.tensor([pos])).logits[0, -1]
        assert steps[t] == pytest.approx(-torch.log_softmax(logits, -1)[ids[t + 1]].item(), abs=1e-4)


def test_policy_bounds_cache_and_returns_slot_position(tiny_llama):
    cache = DynamicCache()
    with torch.no_grad():
        tiny_llama(torch.arange(10)[None], **cache_kwargs(tiny_llama, cache))
    pol = ppl.SinkWindowPolicy(sink=2, window=3)
    assert pol(tiny_llama, cache, 10) == 5
    assert all(layer.keys.shape[-2] == 5 and layer.values.shape[-2] == 5 for layer in cache.layers)
    assert ppl.SinkWindowPolicy(2, 3, shift_positions=False)(tiny_llama, cache, 11) == 11


def test_rerotate_equals_direct_rope(tiny_llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    k = torch.randn(1, 2, 1, 8)  # [B, Hkv, T, D]
    rot = tiny_llama.model.rotary_emb

    def at(p):
        cos, sin = rot(k, torch.tensor([[p]]))
        return apply_rotary_pos_emb(k, k, cos, sin)[1]

    assert torch.allclose(ppl.rerotate_keys(tiny_llama, at(9), -4), at(5), atol=1e-5)
    assert torch.allclose(ppl.rerotate_keys(tiny_llama, at(2), 7), at(9), atol=1e-5)


def test_policy_spec_errors():
    assert isinstance(ppl.make_policy("sink_window", sink=1, window=2), ppl.SinkWindowPolicy)
    with pytest.raises(ValueError, match="unknown"):
        ppl.make_policy("h2o")
    with pytest.raises(ValueError, match="sink >= 0"):
        ppl.SinkWindowPolicy(-1, 4)


def test_wikitext_blocks(byte_tok, tmp_path):
    text = tmp_path / "test.txt"
    text.write_text(" \n = Robert = \n" + "abc " * 100)  # 416 byte tokens
    blocks = ppl.wikitext_blocks(byte_tok, block_tokens=100, path=text)
    assert len(blocks) == 4 and all(len(b) == 100 for b in blocks)  # the partial last block is dropped
    assert byte_tok.decode(blocks[0][:11].tolist()) == " \n = Robert"
    assert torch.equal(torch.cat(blocks), torch.tensor(byte_tok(text.read_text())["input_ids"][:400]))
