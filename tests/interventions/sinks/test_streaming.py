"""StreamingLLM: slot selection, exact equivalence with a fresh run on the kept tokens, generate(), batching."""

import pytest
import torch

import attnkit
from attnkit.hooks.compat import cache_kwargs, output_cache
from attnkit.interventions.sinks.streaming import StreamingLLM, keep_slots
from attnkit.testing import tiny_causal_lm


def test_keep_slots_worked_example_and_padding():
    assert keep_slots(torch.ones(1, 10, dtype=torch.bool), 2, 3).tolist() == [[0, 1, 7, 8, 9]]
    real = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]]).bool()  # left padded: sinks are the first real tokens
    assert keep_slots(real, 2, 3).tolist() == [[2, 3, 7, 8, 9]]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_positions_are_cache_slots_exact_on_one_layer(family):
    """1 layer: the cached step after eviction equals a fresh run on [t0, t1, t7, t8, t9, t10] (positions 0..5)."""
    model = tiny_causal_lm(family, num_hidden_layers=1)
    toks = torch.randint(3, 100, (1, 11), generator=torch.Generator().manual_seed(0))
    iv = StreamingLLM(num_sinks=2, window=3, evict="per_call")
    with attnkit.attach(model, [iv]), torch.no_grad():
        out = model(toks[:, :10], use_cache=True)
        assert output_cache(out).get_seq_length() == 5
        step = model(toks[:, 10:], **cache_kwargs(model, output_cache(out))).logits[0, -1]
        assert iv._pos.tolist() == [[0, 1, 2, 3, 4]]
    with torch.no_grad():
        fresh = model(toks[:, [0, 1, 7, 8, 9, 10]]).logits[0, -1]
        absolute = model(toks).logits[0, -1]
    assert torch.allclose(step, fresh, atol=1e-5)
    assert not torch.allclose(step, absolute, atol=1e-3)


def test_without_position_shift_kept_keys_keep_their_original_positions():
    """pos_shift=False (the PPL script without --enable_pos_shift, as attnkit's SinkWindowPolicy reads it): after
    eviction the step equals a fresh run on the kept tokens at their original positions 0, 1, 7, 8, 9 and 10."""
    model = tiny_causal_lm("llama", num_hidden_layers=1)
    toks = torch.randint(3, 100, (1, 11), generator=torch.Generator().manual_seed(0))
    iv = StreamingLLM(num_sinks=2, window=3, evict="per_call", pos_shift=False)
    with attnkit.attach(model, [iv]), torch.no_grad():
        out = model(toks[:, :10], use_cache=True)
        assert output_cache(out).get_seq_length() == 5 and iv._pos.tolist() == [[0, 1, 7, 8, 9]]
        step = model(toks[:, 10:], **cache_kwargs(model, output_cache(out))).logits[0, -1]
    kept = [0, 1, 7, 8, 9, 10]
    with torch.no_grad():
        fresh = model(toks[:, kept], position_ids=torch.tensor([kept])).logits[0, -1]
        shifted = model(toks[:, kept]).logits[0, -1]
    assert torch.allclose(step, fresh, atol=1e-5)
    assert not torch.allclose(step, shifted, atol=1e-3)


def _greedy_turn(model, ids, cache, n):
    """The chat demo's turn: feed the prompt on the cache, then n − 1 greedy tokens (the last one is not fed)."""
    out = model(ids, **cache_kwargs(model, cache))
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(torch.tensor([[tokens[-1]]]), **cache_kwargs(model, output_cache(out)))
        tokens.append(int(out.logits[0, -1].argmax()))
    return output_cache(out), tokens, out.logits[0, -1]


@pytest.mark.parametrize("pos_shift", [True, False])
def test_chat_demo_eviction_before_each_prompt(pos_shift):
    """evict="per_prompt" (run_streaming_llama.py): the cache grows within a turn; before the next prompt it is cut
    to the sinks and the last window − (prompt + reserve) tokens. Sinks 2, window 6, reserve 2; turn 1: a 6-token
    prompt and 3 answer tokens (8 cached); turn 2: a 3-token prompt needs 5 free slots → t0, t1 and t7 stay."""
    model = tiny_causal_lm("llama", num_hidden_layers=1)
    g = torch.Generator().manual_seed(2)
    p1, p2 = torch.randint(3, 100, (1, 6), generator=g), torch.randint(3, 100, (1, 3), generator=g)
    iv = StreamingLLM(num_sinks=2, window=6, reserve=2, pos_shift=pos_shift)  # evict="per_prompt" is the default
    with attnkit.attach(model, [iv]), torch.no_grad():
        cache, answer, _ = _greedy_turn(model, p1, None, 3)
        assert cache.get_seq_length() == 8 and iv.max_cache_seen == 8  # never cut while answering
        cache, _, last = _greedy_turn(model, p2, cache, 1)
        assert cache.get_seq_length() == 6
    seq = torch.cat([p1, torch.tensor([answer[:2]])], 1)[0].tolist()  # the 8 tokens cached after turn 1
    kept = [seq[0], seq[1], seq[7]] + p2[0].tolist()
    original = [0, 1, 7, 8, 9, 10]
    positions = list(range(6)) if pos_shift else original
    with torch.no_grad():
        fresh = model(torch.tensor([kept]), position_ids=torch.tensor([positions])).logits[0, -1]
        full = model(torch.tensor([seq + p2[0].tolist()])).logits[0, -1]
    assert torch.allclose(last, fresh, atol=1e-5)
    assert not torch.allclose(last, full, atol=1e-3)
    for evict, length in (("per_prompt", 8), ("per_call", 6)):  # window 4: only the PPL policy cuts within a turn
        with attnkit.attach(model, [StreamingLLM(num_sinks=2, window=4, evict=evict)]), torch.no_grad():
            cache, _, _ = _greedy_turn(model, p1, None, 3)
            assert cache.get_seq_length() == length


def test_generate_beyond_window_is_bounded_and_finite():
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    iv = StreamingLLM(num_sinks=2, window=8, evict="per_call")
    with attnkit.attach(model, [iv]), torch.no_grad():
        gen = model.generate(ids, max_new_tokens=40, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert gen.sequences.shape == (1, 46)
    assert iv.max_cache_seen <= 10
    assert all(torch.isfinite(s).all() for s in gen.scores)


def test_batched_generate_equals_per_sample_with_left_padding():
    model = tiny_causal_lm("llama")
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, 100, (1, 9), generator=g), torch.randint(3, 100, (1, 6), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with attnkit.attach(model, [StreamingLLM(num_sinks=2, window=5, evict="per_call")]), torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)
        single_a = model.generate(a, **kw)
        single_b = model.generate(b, **kw)
    assert torch.equal(batched[0, 9:], single_a[0, 9:])
    assert torch.equal(batched[1, 9:], single_b[0, 6:])


def test_rejects_models_without_rope():
    with pytest.raises(ValueError, match="rotary position embeddings"):
        attnkit.attach(tiny_causal_lm("gpt2"), [StreamingLLM(num_sinks=1, window=4)])


@pytest.mark.slow
def test_smollm2_streaming_generate(smollm2):
    model, tok = smollm2
    enc = tok(["Write a long story about a dragon who"], return_tensors="pt")
    iv = StreamingLLM(num_sinks=4, window=12, evict="per_call")
    with attnkit.attach(model, [iv]), torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=24, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    assert iv.max_cache_seen <= 16
    assert all(torch.isfinite(s).all() for s in gen.scores)
    text = tok.decode(gen.sequences[0, enc["input_ids"].shape[1]:])
    assert len(set(text.split())) > 3, text  # not collapsed into one repeated token
