"""PASTA: the log-alpha bias by hand, fused == eager, batched == per-sample, decode steps, real SmolLM2."""

import math

import pytest
import torch

import attnkit
from attnkit.hooks.compat import cache_kwargs, output_cache
from attnkit.interventions.base import AttentionContext
from attnkit.interventions.steering.pasta import Pasta
from attnkit.kernels.eager import eager_attention
from attnkit.kernels.plan import PlanEntry
from attnkit.spans import SequenceTracker
from attnkit.testing import tiny_causal_lm


def _ctx_factory(tracker, q_len, k_len):
    def make(entry):
        return AttentionContext(layer=0, module=None, tracker=tracker, batch=1, num_heads=1, q_len=q_len, k_len=k_len,
                                causal=True, device=torch.device("cpu"), heads=entry.head_mask)
    return make


def test_worked_example_prompt_and_generated_keys():
    # METHODS.md §9: four prompt keys with zero scores, G = {1, 2}, alpha = 0.01; then one generated key
    tracker = SequenceTracker()
    tracker.set_span("emphasis", [[(1, 3)]])
    tracker.observe(torch.tensor([[5, 6, 7, 8]]), None, past_length=0)
    entry = PlanEntry(Pasta(alpha=0.01), torch.tensor([True]))
    q, k = torch.zeros(1, 1, 1, 8), torch.randn(1, 1, 4, 8)
    _, probs = eager_attention(q, k, k, None, scaling=1.0, entries=[entry], make_ctx=_ctx_factory(tracker, 1, 4))
    assert [round(p, 5) for p in probs[0, 0, 0].tolist()] == [0.00495, 0.49505, 0.49505, 0.00495]
    tracker.observe(torch.tensor([[9]]), None, past_length=4)  # a generated token: never down-weighted
    k = torch.randn(1, 1, 5, 8)
    _, probs = eager_attention(q, k, k, None, scaling=1.0, entries=[entry], make_ctx=_ctx_factory(tracker, 1, 5))
    assert [round(p, 5) for p in probs[0, 0, 0].tolist()] == [0.00331, 0.33113, 0.33113, 0.00331, 0.33113]


def _batch():
    ids = torch.tensor([[0, 0, 1, 5, 7, 9, 11, 13, 15], [1, 4, 6, 8, 10, 12, 14, 16, 18]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    spans = [[(4, 6)], [(2, 5)]]  # padded coordinates
    return ids, mask, spans


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_intervened_rows_equal_softmax_of_scores_plus_log_alpha(backend):
    model = tiny_causal_lm("llama")
    ids, mask, spans = _batch()
    alpha, heads = 0.05, [0, 3]
    with torch.no_grad():
        with attnkit.attach(model, []) as h, h.capture(layers=[0], queries="all") as cap:
            model(input_ids=ids, attention_mask=mask)
        stock = cap.last(0)  # [B, H, N, N]
        with attnkit.attach(model, [Pasta(alpha=alpha, layers=[0], heads=heads)], backend=backend) as h:
            h.set_span("emphasis", spans)
            with h.capture(layers=[0], queries="all") as cap:
                model(input_ids=ids, attention_mask=mask)
            assert h.report()["modules"][0]["backend"] == backend
        steered = cap.last(0)
    span = torch.zeros_like(mask, dtype=torch.bool)
    for b, ((s, e),) in enumerate(spans):
        span[b, s:e] = True
    bias = torch.where(mask.bool() & ~span, math.log(alpha), 0.0)  # [B, K] non-span prompt keys
    by_hand = torch.softmax(stock.clamp_min(1e-30).log() + bias[:, None, None, :], dim=-1)  # scores up to a row const
    by_hand = torch.where(stock > 0, by_hand, torch.zeros_like(by_hand))
    real_rows = mask.bool()[:, None, :, None]
    for h in range(4):
        want = by_hand[:, h] if h in heads else stock[:, h]
        assert torch.allclose((steered[:, h] * real_rows[:, 0]), (want * real_rows[:, 0]), atol=1e-5)


def test_fused_equals_eager_and_batched_equals_per_sample():
    model = tiny_causal_lm("qwen2")
    ids, mask, spans = _batch()
    got = {}
    with torch.no_grad():
        for backend in ("torch", "eager"):
            with attnkit.attach(model, [Pasta(alpha=0.01, layers=[0, 1], heads=[1, 2])], backend=backend) as h:
                h.set_span("emphasis", spans)
                got[backend] = model(input_ids=ids, attention_mask=mask).logits
                alone = []
                for b in range(2):
                    real = mask[b].bool()
                    start = int((~real).sum())
                    h.set_span("emphasis", [[(s - start, e - start) for s, e in spans[b]]])
                    alone.append(model(input_ids=ids[b:b + 1, start:]).logits[0, -1])
                assert torch.allclose(got[backend][:, -1], torch.stack(alone), atol=1e-5)
        stock = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(got["torch"][real], got["eager"][real], atol=1e-5)
    assert not torch.allclose(got["torch"][real], stock[real], atol=1e-3)


def test_decode_steps_keep_steering_prompt_keys_only():
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    nxt = torch.tensor([[17]])
    alpha = 0.1
    rows = {}
    with torch.no_grad():
        for name, recipe in (("stock", []), ("pasta", [Pasta(alpha=alpha, layers=[0])])):
            with attnkit.attach(model, recipe) as h:
                h.set_span("emphasis", [[(2, 4)]])
                out = model(input_ids=ids, use_cache=True)
                with h.capture(layers=[0]) as cap:  # layer 0's q/k do not depend on the steering
                    model(input_ids=nxt, **cache_kwargs(model, output_cache(out)))
                rows[name] = cap.last(0)[0, :, 0]  # [H, K=7]
    w = torch.tensor([alpha, alpha, 1, 1, alpha, alpha, 1.0])  # prompt outside span × alpha; generated key × 1
    want = rows["stock"] * w
    assert torch.allclose(rows["pasta"], want / want.sum(-1, keepdim=True), atol=1e-5)


def _rows(model, recipe, span, ids, nxt=None):
    """Layer-0 attention rows [H, Q, K] of a prefill of ``ids`` (or of the decode step ``nxt`` after it)."""
    with torch.no_grad(), attnkit.attach(model, recipe) as h:
        h.set_span("emphasis", span)
        if nxt is None:
            with h.capture(layers=[0], queries="all") as cap:
                model(input_ids=ids)
        else:
            out = model(input_ids=ids, use_cache=True)
            with h.capture(layers=[0]) as cap:  # layer 0's q/k do not depend on the steering
                model(input_ids=nxt, **cache_kwargs(model, output_cache(out)))
    return cap.last(0)[0]


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_several_sections_are_steered_one_by_one_as_the_released_hook(backend):
    """Two sections: each adds log α outside itself, so a prompt key in c of the S sections gets α^(S − c) and a
    generated key keeps 1 (the released ``edit_multisection_attention``; merging the ranges would give α and 1)."""
    model = tiny_causal_lm("llama")
    ids, nxt, alpha = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 19]]), torch.tensor([[17]]), 0.1
    pasta = lambda: [Pasta(alpha=alpha, layers=[0])]  # noqa: E731
    two = [[(2, 4), (5, 7)]]
    stock = _rows(model, [], two, ids, nxt)[:, 0]  # [H, K=9]
    steered = _rows(model, pasta(), two, ids, nxt)[:, 0]
    a = alpha
    w = torch.tensor([a * a, a * a, a, a, a * a, a, a, a * a, 1.0])
    want = stock * w
    assert torch.allclose(steered, want / want.sum(-1, keepdim=True), atol=1e-5)
    merged = stock * torch.tensor([a, a, 1, 1, a, 1, 1, a, 1.0])
    assert not torch.allclose(steered, merged / merged.sum(-1, keepdim=True), atol=1e-3)
    # overlapping sections inside the prefill: (1, 4) and (3, 5) → counts 0 1 1 2 1 0 0 0, S = 2
    stock = _rows(model, [], two, ids)  # [H, N, N]
    steered = _rows(model, pasta(), [[(1, 4), (3, 5)]], ids)
    w = torch.tensor([a * a, a, a, 1.0, a, a * a, a * a, a * a])
    want = stock * w
    assert torch.allclose(steered, want / want.sum(-1, keepdim=True), atol=1e-5)
    # a bool mask: one section per run of consecutive tokens, the same as the two ranges
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 2:4] = mask[0, 5:7] = True
    assert torch.allclose(_rows(model, pasta(), mask, ids, nxt), _rows(model, pasta(), two, ids, nxt), atol=1e-6)


def test_include_and_generation_modes_per_section():
    from attnkit.interventions.steering.pasta import pasta_key_bias

    counts = torch.tensor([[0, 1, 2, 1, 0, 0]])  # two sections overlapping on key 2; key 5 was generated
    prompt = torch.tensor([[True] * 5 + [False]])
    two = torch.tensor([2])
    log_a = math.log(4.0)
    include = pasta_key_bias(counts, prompt, 4.0, "include", two) / log_a
    assert include.tolist() == [[-1.0, 0.0, 1.0, 0.0, -1.0, 0.0]]  # +log α per section, −log α once on prompt keys
    generation = pasta_key_bias(counts, prompt, 4.0, "generation", two) / log_a
    assert generation.tolist() == [[2.0, 2.0, 2.0, 2.0, 2.0, 0.0]]
    one = pasta_key_bias(counts.clamp(max=1), prompt, 0.0, "exclude")  # α = 0 masks without NaN
    assert one.isinf().tolist() == [[True, False, False, False, True, False]] and not one.isnan().any()


def test_generate_with_kv_cache_fused_equals_eager():
    model = tiny_causal_lm("llama")
    ids, mask, spans = _batch()
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    res = {}
    with torch.no_grad():
        for backend in ("torch", "eager"):
            with attnkit.attach(model, [Pasta(alpha=0.01, layers=[1])], backend=backend) as h:
                h.set_span("emphasis", spans)
                res[backend] = model.generate(input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(res["torch"].sequences, res["eager"].sequences)
    for a, b in zip(res["torch"].scores, res["eager"].scores):
        assert torch.allclose(a, b, atol=1e-4)


def test_real_smollm2_pasta_moves_attention_to_the_span(smollm2):
    model, tokenizer = smollm2
    prompts = ["Answer in French. The capital of Italy is", "Be brief. Water boils at"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    n = batch["input_ids"].shape[1]
    pads = (batch["attention_mask"] == 0).sum(1).tolist()
    instr = [len(tokenizer(p.split(".")[0] + ".")["input_ids"]) for p in prompts]
    spans = [[(pads[b] + 1, pads[b] + instr[b])] for b in range(2)]  # the instruction, minus the sink token
    layers, heads = [8, 9, 10], [0, 1, 2]
    with torch.no_grad():
        with attnkit.attach(model, []) as h, h.capture(layers=layers, heads=heads) as cap:
            model(**batch)
        stock = torch.stack([cap.last(layer) for layer in layers])  # [L, B, Hs, 1, N]
        with attnkit.attach(model, [Pasta(alpha=0.01, layers=layers, heads=heads)]) as h:
            h.set_span("emphasis", spans)
            with h.capture(layers=layers, heads=heads) as cap:
                model(**batch)
            steered = torch.stack([cap.last(layer) for layer in layers])
            assert {m["backend"] for m in h.report()["modules"]} == {"torch"}
            tokens = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    span = torch.zeros(2, n, dtype=torch.bool)
    for b, ((s, e),) in enumerate(spans):
        span[b, s:e] = True
    mass = lambda p: (p[..., 0, :] * span[None, :, None, :]).sum(-1)  # noqa: E731  [L, B, Hs]
    assert (mass(steered) > mass(stock)).all()
    assert mass(steered).mean() > 0.5 > mass(stock).mean()
    assert tokens.shape == (2, n + 4)
