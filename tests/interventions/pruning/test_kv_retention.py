"""Per-head KV retention: sink + window by hand, retrieval heads untouched, fused == eager, padding, decode."""

import torch

import attnkit
from attnkit.interventions.pruning.kv_retention import KVRetention, streaming_allowed
from attnkit.testing import tiny_causal_lm

IDS = torch.tensor([[0, 0, 1, 5, 7, 9, 11, 13, 15, 17, 19, 21], [1, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]])
MASK = torch.tensor([[0, 0] + [1] * 10, [1] * 12])


def test_worked_example_and_rows_by_hand():
    assert streaming_allowed(torch.ones(1, 10, dtype=torch.bool), 1, 2, 3)[0, 0].nonzero().flatten().tolist() == \
        [0, 1, 7, 8, 9]
    model = tiny_causal_lm("llama")  # 4 query heads on 2 KV heads: heads {0,1} share KV head 0
    with torch.no_grad():
        with attnkit.attach(model, []) as h, h.capture(layers=[0], queries="all") as cap:
            model(input_ids=IDS, attention_mask=MASK)
        stock = cap.last(0)
        with attnkit.attach(model, [KVRetention(retrieval_heads={0: [1]}, sinks=2, window=3, layers=[0])]) as h:
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


def test_fused_equals_eager_batched_equals_per_sample_and_generate():
    model = tiny_causal_lm("qwen2")
    kw = dict(retrieval_heads={1: [0]}, sinks=2, window=4)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    got, res = {}, {}
    with torch.no_grad():
        for backend in ("torch", "eager"):
            with attnkit.attach(model, [KVRetention(**kw)], backend=backend) as h:
                got[backend] = model(input_ids=IDS, attention_mask=MASK).logits[:, -1]
                alone = torch.cat([model(input_ids=IDS[:1, 2:]).logits[:, -1], model(input_ids=IDS[1:]).logits[:, -1]])
                assert torch.allclose(got[backend], alone, atol=1e-5)
                res[backend] = model.generate(input_ids=IDS, attention_mask=MASK, **gen)
                nocache = model.generate(input_ids=IDS, attention_mask=MASK, use_cache=False, **gen)
                for a, b in zip(res[backend].scores, nocache.scores):  # decode rows == full recompute rows
                    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(got["torch"], got["eager"], atol=1e-5)
    assert torch.equal(res["torch"].sequences, res["eager"].sequences)


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
