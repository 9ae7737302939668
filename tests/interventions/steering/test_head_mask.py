"""head-mask (Retrieval-Head paper masking, METHODS.md §7): blocked heads attend uniformly, hand-checked."""

import pytest
import torch

import attnkit
from attnkit.hooks.compat import cache_kwargs, output_cache
from attnkit.interventions.steering.head_mask import HeadMask
from attnkit.testing import tiny_causal_lm

PROMPT = torch.tensor([[1, 5, 7, 9, 11]])


def _rows(model, recipe, backend="torch"):
    """Captured prefill rows (all) and one decode row of layer 1, every head: ([H, 5, 5], [H, 6])."""
    with attnkit.attach(model, recipe, backend=backend) as h, torch.no_grad():
        with h.capture(layers=[1], queries="all") as cap:
            out = model(PROMPT, use_cache=True)
        prefill = cap.last(1)[0]
        with h.capture(layers=[1]) as cap:
            step = model(torch.tensor([[13]]), **cache_kwargs(model, output_cache(out)))
        return prefill, cap.last(1)[0, :, 0], out.logits, step.logits


def test_decode_only_masks_only_decode_rows_of_target_heads():
    model = tiny_causal_lm("llama")
    stock_pre, stock_dec, stock_logits, stock_step = _rows(model, [])
    pre, dec, logits, step = _rows(model, [HeadMask(heads={1: [2]})])
    assert torch.allclose(dec[2], torch.full((6,), 1 / 6))  # hand value: 6 visible keys, all 1/6
    others = [0, 1, 3]
    assert torch.allclose(dec[others], stock_dec[others], atol=1e-6)
    assert torch.allclose(pre, stock_pre, atol=1e-6)  # prefill untouched (the paper masks decode steps only)
    assert torch.allclose(logits, stock_logits, atol=1e-5)
    assert not torch.allclose(step, stock_step, atol=1e-4)


def test_masking_prefill_gives_uniform_causal_rows():
    model = tiny_causal_lm("llama")
    pre, _, _, _ = _rows(model, [HeadMask(decode_only=False, heads={1: [0]})])
    want = torch.tril(torch.ones(5, 5)) / torch.arange(1, 6)[:, None]  # row i: 1/(i+1) on keys 0..i, 0 on the future
    assert torch.allclose(pre[0], want, atol=1e-6)


def test_masked_head_output_is_the_mean_of_values_and_backends_agree():
    model = tiny_causal_lm("llama")
    recipe = lambda: [HeadMask(decode_only=False, heads={0: [1, 3], 1: [2]})]  # noqa: E731
    _, _, torch_logits, torch_step = _rows(model, recipe(), backend="torch")
    _, _, eager_logits, eager_step = _rows(model, recipe(), backend="eager")
    assert torch.allclose(torch_logits, eager_logits, atol=1e-5)
    assert torch.allclose(torch_step, eager_step, atol=1e-5)
    # the attention output of a blocked head is the plain causal average of its values
    from attnkit.kernels.torch_path import torch_attention
    from attnkit.kernels.plan import PlanEntry

    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    entry = PlanEntry(HeadMask(decode_only=False), torch.tensor([True, False]))
    ctx = type("C", (), {"num_heads": 2, "device": torch.device("cpu"), "is_prefill": True})()
    out = torch_attention(q, k, v, None, scaling=8 ** -0.5, entries=[entry], make_ctx=lambda e, rows=None: ctx)
    causal_mean = v[0, 0].cumsum(0) / torch.arange(1, 5)[:, None]
    assert torch.allclose(out[0, 0], causal_mean, atol=1e-6)
    stock = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=8 ** -0.5)
    assert torch.allclose(out[0, 1], stock[0, 1], atol=1e-6)


def test_registered_and_validated():
    assert attnkit.get_intervention("head-mask") is HeadMask
    with pytest.raises(ValueError):
        HeadMask(decode_only="yes")
