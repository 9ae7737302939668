"""ACT: METHODS.md detection and calibration examples, the rule inside a tiny LM, batching, cache, SmolLM2."""

from types import SimpleNamespace

import pytest
import torch

import attnkit
from attnkit.hooks.compat import cache_kwargs, output_cache
from attnkit.interventions.sinks.act import ACT, act_calibrate_row, act_factors
from attnkit.interventions.sinks.detect import act_column_scores, act_sinks
from attnkit.kernels.backends import BACKENDS
from attnkit.kernels.eager import reweight_groups
from attnkit.testing import tiny_causal_lm

DETECT = torch.tensor([[1, 0, 0, 0], [.6, .4, 0, 0], [.5, .3, .2, 0], [.4, .3, .05, .25]])[None, None]


def test_detection_example():
    assert torch.allclose(act_column_scores(DETECT)[0, 0], torch.tensor([0.625, 1 / 3, 0.125, 0.25]))
    assert act_sinks(DETECT)[0, 0].tolist() == [False, True, True, True]
    assert act_sinks(DETECT, drop_first="none")[0, 0].tolist() == [True] * 4
    assert act_sinks(DETECT, drop_first="token")[0, 0].tolist() == [False, True, True, True]
    # paper test: score > 5/N = 1.25 -> nothing
    assert not act_sinks(DETECT, test="paper")[0, 0].any()
    assert act_sinks(DETECT, test="paper", alpha=1.2, drop_first="none")[0, 0].tolist() == [True, True, False, False]


def test_detection_with_left_padding_matches_unpadded():
    padded = torch.zeros(1, 1, 6, 6)
    padded[0, 0, 2:, 2:] = DETECT[0, 0]
    real = torch.tensor([[0, 0, 1, 1, 1, 1]]).bool()
    assert torch.allclose(act_column_scores(padded, real)[0, 0, 2:], act_column_scores(DETECT)[0, 0])
    assert act_sinks(padded, real)[0, 0].tolist() == [False, False, False, True, True, True]


def test_calibration_example_through_group_reweighting():
    row = torch.tensor([0.30, 0.10, 0.10, 0.30, 0.10, 0.10])
    expected = torch.tensor([0.377143, 0.125714, 0.125714, 0.12, 0.125714, 0.125714])
    sink = torch.tensor([False, False, False, True, False, False])
    assert torch.allclose(act_calibrate_row(row, sink, 0.4), expected, atol=1e-6)
    groups = sink.long().view(1, -1)
    out = reweight_groups(row.view(1, 1, 1, -1), groups,
                          lambda m: act_factors(m, torch.tensor([[[False, True]]]), 0.4), torch.ones(1, dtype=torch.bool))
    assert torch.allclose(out.view(-1), expected, atol=1e-6)


def _entry_sinks(handle, iv, layer_index=0):
    entry = handle.plan_entries(iv)[layer_index]
    return iv.sinks(SimpleNamespace(state=entry.state))


@pytest.mark.parametrize("sink_test", ["code", "paper"])
def test_rule_inside_tiny_lm(sink_test):
    """Edited prefill rows = act_calibrate_row(stock rows, detected per-head sinks); detection = act_sinks(stock)."""
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with attnkit.attach(model, [], backend="eager") as h, h.capture(layers=[1], queries="all") as cap, torch.no_grad():
        model(ids)
    stock = cap.last(1)
    iv = ACT(layers=[1], heads=[0, 2, 3], sink_test=sink_test, theta=0.08, alpha=1.0)
    with attnkit.attach(model, [iv], backend="eager") as h, h.capture(layers=[1], queries="all") as cap, torch.no_grad():
        model(ids)
        sinks = _entry_sinks(h, iv)  # [B, H, N]
    edited = cap.last(1)
    want_sinks = act_sinks(stock, None, test=sink_test, theta=0.08, alpha=1.0)
    want_sinks[:, 1] = False  # head 1 is not targeted
    assert torch.equal(sinks, want_sinks) and sinks.any()
    want = act_calibrate_row(stock, sinks[:, :, None, :], 0.4)
    assert torch.allclose(edited, want, atol=1e-5)
    assert torch.allclose(edited[:, 1], stock[:, 1], atol=1e-6)


def test_batched_equals_per_sample_with_left_padding():
    model = tiny_causal_lm("qwen2")
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(3, 100, (1, 10), generator=g), torch.randint(3, 100, (1, 7), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    iv = ACT(theta=0.08)
    with attnkit.attach(model, [iv], backend="eager"), torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        la, lb = model(a).logits, model(b).logits
    assert torch.allclose(batched[0], la[0], atol=1e-4)
    assert torch.allclose(batched[1, 3:], lb[0], atol=1e-4)


def test_generate_reuses_prefill_sinks():
    """Decode rows get the prefill sink set: the cached step equals the rule applied to a fresh run's last row."""
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(3))
    iv = ACT(layers=[0], theta=0.08)
    with attnkit.attach(model, [iv], backend="eager") as h, torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        prefill_sinks = _entry_sinks(h, iv)
        assert out.shape == (1, 15) and prefill_sinks.any()
        with h.capture(layers=[0], queries="last") as cap:  # one decode step with the cache
            first = model(ids, use_cache=True)
            model(out[:, 10:11], **cache_kwargs(model, output_cache(first)))
        cached_row = cap.last(0)[:, :, -1]
    with attnkit.attach(model, [], backend="eager") as h, h.capture(layers=[0], queries="last") as cap, torch.no_grad():
        model(out[:, :11])
    stock_row = cap.last(0)[:, :, -1]  # [B, H, 11]; layer 0 input does not depend on edits
    sinks = torch.nn.functional.pad(prefill_sinks, (0, 1))
    assert torch.allclose(cached_row, act_calibrate_row(stock_row, sinks, 0.4), atol=1e-5)


def test_parity_with_fast_backend():
    """ACT on the fused torch backend (key statistics from q/k, exact group partials) equals the eager reference."""
    assert {"group_factors", "key_stats"} <= BACKENDS.get("torch").capabilities
    model = tiny_causal_lm("llama", num_hidden_layers=3)
    ids = torch.randint(3, 100, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    gen = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    results = {}
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        for backend in ("eager", "torch"):
            act = ACT(beta=0.4, sink_test="code", theta=0.1, layers=[1, 2])
            with attnkit.attach(model, [act], backend=backend) as handle:
                assert {m["backend"] for m in handle.report()["modules"]} == {backend}
                results[backend] = (model(ids, attention_mask=mask).logits, model.generate(ids, **gen))
    real = mask.bool()
    assert (results["eager"][0] - stock)[real].abs().max() > 1e-4  # sinks were found and damped
    assert (results["torch"][0] - results["eager"][0])[real].abs().max() <= 2e-5
    assert torch.equal(results["torch"][1], results["eager"][1])


@pytest.mark.slow
def test_smollm2_act_lowers_sink_attention(smollm2):
    model, tok = smollm2
    enc = tok(["The capital of France is"], return_tensors="pt")
    layers = list(range(2, model.config.num_hidden_layers - 1))
    with attnkit.attach(model, [], backend="eager") as h, h.capture(layers=[12]) as cap, torch.no_grad():
        base = model.generate(**enc, max_new_tokens=3, do_sample=False)
    stock = cap.records[0].probs
    with attnkit.attach(model, "act-llama") as h, h.capture(layers=[12]) as cap, torch.no_grad():
        out = model(**enc).logits
        gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(out).all() and gen.shape == base.shape
    edited = cap.records[0].probs
    assert torch.allclose(edited.sum(-1), torch.ones_like(edited.sum(-1)), atol=1e-4)
    assert not torch.allclose(edited, stock, atol=1e-3)
    del layers


def test_decode_steps_skip_the_column_pass(monkeypatch):
    """Ŝ is fixed at the prefill: the fused backend computes column statistics there only (one pass per ACT layer)."""
    import attnkit.kernels.torch_path as torch_path

    calls = []
    real = torch_path.key_mass
    monkeypatch.setattr(torch_path, "key_mass", lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k))
    model = tiny_causal_lm("llama", num_hidden_layers=3)
    ids = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(4))
    with attnkit.attach(model, [ACT(layers=[1, 2], theta=0.08)], backend="torch"), torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert calls == [10, 10]  # two layers at the 10-token prefill, nothing on the 3 decoding steps


def test_decode_slots_follow_a_growing_sequence_and_a_new_prompt():
    """The decoding steps read the prefill's sink slots from a buffer that grows past twice the prompt and is rebuilt
    by the next prefill: every step's logits equal the eager reference through both prompts."""
    model = tiny_causal_lm("llama", num_hidden_layers=2)
    prompts = [torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(n)) for n in (9, 5)]
    gen = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    runs = {}
    for backend in ("eager", "torch", None):
        recipe = [] if backend is None else [ACT(beta=0.2, theta=0.08, layers=[0, 1])]
        with attnkit.attach(model, recipe, backend=backend or "eager"), torch.no_grad():
            runs[backend] = [torch.stack(model.generate(p, **gen).logits) for p in prompts]  # [steps, 1, vocab]
    for eager, fused, stock in zip(runs["eager"], runs["torch"], runs[None]):
        assert (eager[0] - stock[0]).abs().max() > 1e-3  # sinks were found and damped at every prompt
        assert (fused - eager).abs().max() <= 1e-4


def test_decode_slot_ids_against_padding_the_prefill_slots():
    """Slot ids at each length are the prefill's slots padded with 0, also past the buffer's capacity and after the
    next prompt's prefill stores new slots."""
    act, state = ACT(), {"act_slot": torch.tensor([[0, 2, 0, 1]])}

    def ids_at(length):
        ctx = SimpleNamespace(state=state, batch=1, k_len=length, device="cpu", tracker=SimpleNamespace(length=length),
                              keys_of=lambda tracked: tracked)
        return act.key_group_ids(ctx).tolist()

    for length in (3, 4, 5, 9, 17, 40):
        assert ids_at(length) == [([0, 2, 0, 1] + [0] * length)[:length]]
    state["act_slot"] = torch.tensor([[1, 0, 0]])  # the next prompt's prefill
    assert ids_at(6) == [[1, 0, 0, 0, 0, 0]]
