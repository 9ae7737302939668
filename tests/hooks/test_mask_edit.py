"""override_mask: blocks replace the model's mask exactly (against transformers' own custom 4-D mask), on every
backend, per head, under padding and with a float (eager) model mask; padding keys never become visible."""

import pytest
import torch

import attnkit
from attnkit.hooks.mask_edit import apply_mask_overrides
from attnkit.interventions.base import Intervention, MaskBlock
from attnkit.kernels.plan import PlanEntry
from attnkit.testing import tiny_causal_lm

IDS = torch.tensor([[1, 5, 7, 9, 11, 13]])


class Blocks(Intervention):
    name = "test-blocks"

    def __init__(self, q=(1, 3), k=(3, 5), allow=True, **target):
        super().__init__(**target)
        self.q, self.k, self.allow = q, k, allow

    def override_mask(self, ctx):
        queries = torch.zeros(ctx.batch, ctx.q_len, dtype=torch.bool)
        keys = torch.zeros(ctx.batch, ctx.k_len, dtype=torch.bool)
        queries[:, self.q[0]:self.q[1]] = True
        keys[:, self.k[0]:self.k[1]] = True
        return [MaskBlock(queries, keys, self.allow)]


def reference(model, allowed):
    """The model with transformers' own custom 4-D mask (bool for SDPA, additive float for eager)."""
    mask = allowed[None, None]
    if model.config._attn_implementation == "eager":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        return model(IDS, attention_mask=mask).logits


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_blocks_equal_a_custom_4d_mask(backend, impl):
    model = tiny_causal_lm("llama", attn_implementation=impl)
    allowed = torch.ones(6, 6).tril().bool()
    allowed[1:3, 3:5] = True  # rows 1-2 see the later keys 3-4
    with attnkit.attach(model, [Blocks()], backend=backend), torch.no_grad():
        got = model(IDS).logits
    assert torch.allclose(got, reference(model, allowed), atol=1e-5)
    hidden = torch.ones(6, 6).tril().bool()
    hidden[4:, 0:2] = False  # deny: rows 4-5 lose keys 0-1
    with attnkit.attach(model, [Blocks(q=(4, 6), k=(0, 2), allow=False)], backend=backend), torch.no_grad():
        got = model(IDS).logits
    assert torch.allclose(got, reference(model, hidden), atol=1e-5)


def test_head_subset_and_stock_elsewhere():
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        stock = model(IDS).logits
        with attnkit.attach(model, [Blocks(layers=[1], heads=[0])]) as h, h.capture(layers=[1], queries="all") as cap:
            model(IDS)
    probs = cap.last(1)[0]  # [H, Q, K]
    assert probs[0, 1, 3] > 0 and probs[1:, 1, 3:].abs().max() == 0  # only head 0 sees the later keys
    with attnkit.attach(model, [Blocks(q=(0, 0), k=(0, 0))]), torch.no_grad():
        # an empty block leaves the call unchanged (attnkit's fused call, not the stock one: equal to float rounding)
        torch.testing.assert_close(model(IDS).logits, stock, rtol=0, atol=1e-6)


def test_padding_keys_stay_hidden():
    entry = PlanEntry(Blocks(q=(0, 4), k=(0, 4)), torch.ones(2, dtype=torch.bool))

    class Ctx:
        batch, q_len, k_len, spans, tracker = 1, 4, 4, {}, None

        def key_mask(self, name):
            return torch.tensor([[True, True, True, False]])  # key 3 is padding

    ctx = Ctx()
    ctx.tracker = object()
    out = apply_mask_overrides([entry], None, q_len=4, k_len=4, causal=True, make_ctx=lambda e, rows=None: ctx,
                               device="cpu")
    assert out[0, 0, 0].tolist() == [True, True, True, False]  # the block shows keys 1-2 to row 0, never key 3
    float_mask = torch.zeros(1, 1, 4, 4).masked_fill(~torch.ones(4, 4).tril().bool(), torch.finfo(torch.float32).min)
    out = apply_mask_overrides([entry], float_mask, q_len=4, k_len=4, causal=True,
                               make_ctx=lambda e, rows=None: ctx, device="cpu")
    assert out.dtype == torch.float32 and out[0, 0, 0, 2] == 0 and out[0, 0, 0, 3] < -1e30
