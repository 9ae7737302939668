"""Per-head KV retention: sink + window by hand (deployment and Λ training mask), retrieval heads untouched,
decode steps against a real evicting cache, fused == eager, padding."""

import pytest
import torch

import attnkit
from attnkit.hooks.compat import cache_kwargs, output_cache
from attnkit.interventions.pruning.kv_retention import KVRetention, deployed_allowed, streaming_allowed
from attnkit.testing import tiny_causal_lm

IDS = torch.tensor([[0, 0, 1, 5, 7, 9, 11, 13, 15, 17, 19, 21], [1, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]])
MASK = torch.tensor([[0, 0] + [1] * 10, [1] * 12])


def test_windows_by_hand_deployment_vs_training_mask():
    ones = torch.ones(1, 10, dtype=torch.bool)
    # DuoAttention code: the cache holds sink 2 + recent 3 before the step, the new token is appended -> i - j <= 3
    assert deployed_allowed(ones, 1, 2, 3)[0, 0].nonzero().flatten().tolist() == [0, 1, 6, 7, 8, 9]
    # its training mask (generate_streaming_mask: triu(diagonal=-recent+1)) -> i - j < 3
    assert streaming_allowed(ones, 1, 2, 3)[0, 0].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    # chunked prefill: a chunk at 6..9 sees the sinks, the 3 tokens cached before it (3..5) and itself
    assert deployed_allowed(ones, 4, 2, 3)[0, 0].nonzero().flatten().tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    padded = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]]).bool()  # sinks are the first real tokens
    assert deployed_allowed(padded, 1, 2, 3)[0, 0].nonzero().flatten().tolist() == [2, 3, 6, 7, 8, 9]


def test_single_shot_prefill_is_full_attention_under_deployment():
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        stock = model(input_ids=IDS, attention_mask=MASK).logits
        for backend in ("torch", "eager"):
            with attnkit.attach(model, [KVRetention(retrieval_heads={}, sinks=1, window=2)], backend=backend):
                assert torch.allclose(model(input_ids=IDS, attention_mask=MASK).logits, stock, atol=1e-5)
            with attnkit.attach(model, [KVRetention(retrieval_heads={}, sinks=1, window=2, mask="lambda")],
                                backend=backend):
                assert not torch.allclose(model(input_ids=IDS, attention_mask=MASK).logits, stock, atol=1e-3)


def test_worked_example_and_rows_by_hand():
    model = tiny_causal_lm("llama")  # 4 query heads on 2 KV heads: heads {0,1} share KV head 0
    with torch.no_grad():
        with attnkit.attach(model, []) as h, h.capture(layers=[0], queries="all") as cap:
            model(input_ids=IDS, attention_mask=MASK)
        stock = cap.last(0)
        with attnkit.attach(model, [KVRetention(retrieval_heads={0: [1]}, sinks=2, window=3, layers=[0],
                                                mask="lambda")]) as h:
            with h.capture(layers=[0], queries="all") as cap:
                model(input_ids=IDS, attention_mask=MASK)
    steered = cap.last(0)  # [B, H, N, N]
    assert torch.allclose(steered[:, :2], stock[:, :2], atol=1e-6)  # KV head 0 holds a retrieval head: full
    allowed = streaming_allowed(MASK.bool(), 12, 2, 3)[:, None]  # [B, 1, N, N]
    want = stock[:, 2:] * allowed
    want = want / want.sum(-1, keepdim=True).clamp_min(1e-30)
    real = MASK.bool()[:, None, :, None]
    assert torch.allclose(steered[:, 2:] * real, want * real, atol=1e-5)
    # sample 0 is left-padded by 2: its sinks are its first two *real* tokens (positions 2, 3)
    assert steered[0, 2, -1].nonzero().flatten().tolist() == [2, 3, 9, 10, 11]


GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)


def _evict(cache, sinks: int, window: int) -> None:
    """What DuoAttention's streaming cache does after every call: keep the first ``sinks`` and last ``window`` keys
    (post-RoPE, so they keep their original positions)."""
    for layer in cache.layers:
        n = layer.keys.shape[2]
        if n > sinks + window:
            keep = torch.cat([torch.arange(sinks), torch.arange(n - window, n)])
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_decode_steps_equal_a_real_evicting_cache(backend):
    """Every head streams: greedy decode under the mask == the stock model whose cache is cut to sink + window
    after each call (full-attention prefill, original positions), i.e. the deployed DuoAttention cache."""
    model = tiny_causal_lm("llama")
    ids = IDS[1:]  # 12 tokens, no padding
    sinks, window, steps = 2, 4, 6
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, logits, want = output_cache(out), out.logits[:, -1], []
        for t in range(steps):
            token = logits.argmax(-1, keepdim=True)  # [1, 1]
            _evict(cache, sinks, window)
            pos = torch.tensor([[ids.shape[1] + t]])
            logits = model(input_ids=token, position_ids=pos, **cache_kwargs(model, cache)).logits[:, -1]
            want.append(logits)
        with attnkit.attach(model, [KVRetention(retrieval_heads={}, sinks=sinks, window=window)], backend=backend):
            gen = model.generate(input_ids=ids, **GEN, max_new_tokens=steps + 1)
    assert len(gen.logits) == steps + 1
    for step, (got, ref) in enumerate(zip(gen.logits[1:], want)):
        assert torch.allclose(got, ref, atol=1e-4), (step, (got - ref).abs().max())
    with attnkit.attach(model, [KVRetention(retrieval_heads={}, sinks=sinks, window=window, mask="lambda")],
                        backend=backend), torch.no_grad():
        lam = model.generate(input_ids=ids, **GEN, max_new_tokens=steps + 1)
    assert not torch.allclose(lam.logits[0], gen.logits[0], atol=1e-4)  # the Λ mask also restricts the prefill


def test_chunked_prefill_sees_the_whole_chunk():
    """A second chunk on the cache: its streaming rows see the sinks, the window before the chunk and the chunk."""
    model = tiny_causal_lm("llama", num_hidden_layers=1)
    ids = IDS[1:]
    with torch.no_grad():
        with attnkit.attach(model, [KVRetention(retrieval_heads={}, sinks=1, window=2)], backend="eager") as h, \
                h.capture(layers=[0], queries="all") as cap:
            first = model(input_ids=ids[:, :6], use_cache=True)
            model(input_ids=ids[:, 6:], **cache_kwargs(model, output_cache(first)))
        probs = cap.last(0)  # [1, H, 6, 12]: the second chunk's rows
    seen = probs[0].amax(0) > 0  # [6, 12] keys any head attends
    for row in range(6):
        i = 6 + row
        assert seen[row].nonzero().flatten().tolist() == [0] + list(range(4, i + 1))


def test_fused_equals_eager_and_batched_equals_per_sample():
    model = tiny_causal_lm("qwen2")
    kw = dict(retrieval_heads={1: [0]}, sinks=2, window=4)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    got, res = {}, {}
    with torch.no_grad():
        for backend in ("torch", "eager"):
            for mask in ("deploy", "lambda"):
                with attnkit.attach(model, [KVRetention(mask=mask, **kw)], backend=backend):
                    got[backend, mask] = model(input_ids=IDS, attention_mask=MASK).logits[:, -1]
                    alone = torch.cat([model(input_ids=IDS[:1, 2:]).logits[:, -1],
                                       model(input_ids=IDS[1:]).logits[:, -1]])
                    assert torch.allclose(got[backend, mask], alone, atol=1e-5)
                    res[backend, mask] = model.generate(input_ids=IDS, attention_mask=MASK, **gen)
    for mask in ("deploy", "lambda"):
        assert torch.allclose(got["torch", mask], got["eager", mask], atol=1e-5)
        assert torch.equal(res["torch", mask].sequences, res["eager", mask].sequences)
        for a, b in zip(res["torch", mask].scores, res["eager", mask].scores):
            assert torch.allclose(a, b, atol=1e-4)


def test_memory_report_counts_streaming_kv_heads():
    model = tiny_causal_lm("llama")
    kv = KVRetention(retrieval_heads={0: [0, 3]}, sinks=4, window=60)
    with attnkit.attach(model, [kv]):
        report = kv.memory_report(seq_len=1024, bytes_per_value=2)
    # 2 layers x 2 KV heads, head_dim 16: layer 0 keeps both (retrieval), layer 1 streams both
    per_head_token = 2 * 16 * 2
    assert report["full_bytes"] == 4 * 1024 * per_head_token
    assert report["kept_bytes"] == (2 * 1024 + 2 * 64) * per_head_token
    assert report["streaming_kv_heads"] == 2 and abs(report["saved_fraction"] - 0.4688) < 1e-4
