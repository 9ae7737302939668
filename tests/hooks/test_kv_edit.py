"""The edit_kv stage: replaced and appended keys, key biases merged into the model's mask (causality kept), head
subsets, captures and every backend see the edited call; hand-computed references throughout."""

import pytest
import torch

import attnkit
from attnkit.hooks.kv_edit import merge_key_bias
from attnkit.kernels.backends import BACKENDS
from attnkit.testing import denoiser_inputs, tiny_causal_lm, tiny_denoiser


class AppendKeys(attnkit.Intervention):
    """Appends ``n`` keys/values (fixed random) with a per-key logit bias on every row but the first."""

    name = "test-append-keys"

    def __init__(self, n=3, bias=(0.0, 3.0, float("-inf")), skip_first_row=True, **target):
        super().__init__(**target)
        self.n, self.bias, self.skip_first_row = n, bias, skip_first_row
        self.seen = []

    def edit_kv(self, q, k, v, ctx):
        g = torch.Generator().manual_seed(ctx.layer)
        ref_k = torch.randn(1, k.shape[1], self.n, k.shape[3], generator=g).to(k).expand(k.shape[0], -1, -1, -1)
        ref_v = torch.randn(1, v.shape[1], self.n, v.shape[3], generator=g).to(v).expand(v.shape[0], -1, -1, -1)
        extra = torch.tensor(self.bias).repeat(k.shape[0], 1)  # [B, n]
        if self.skip_first_row:
            extra[0] = float("-inf")
        bias = torch.cat([torch.zeros(k.shape[0], k.shape[2]), extra], 1)[:, None, None, :]  # [B,1,1,K+n]
        self.seen.append((q.detach(), k.detach(), v.detach(), ref_k, ref_v, bias))
        return q, torch.cat([k, ref_k], 2), torch.cat([v, ref_v], 2), bias


class SwapKeys(attnkit.Intervention):
    """Every row reads the keys/values of row 0 (same shape), on the targeted heads."""

    name = "test-swap-keys"

    def edit_kv(self, q, k, v, ctx):
        return q, k[:1].expand_as(k), v[:1].expand_as(v), None


def _attn_module(model, name):
    return dict(model.named_modules())[name]


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_appended_keys_match_a_hand_computed_attention(backend):
    model = tiny_denoiser("unet")
    inputs = denoiser_inputs("unet")
    iv = AppendKeys(modules=r"mid_block.*attn1")
    with torch.no_grad(), attnkit.attach(model, [iv], backend=backend) as handle, \
            handle.capture(queries="all") as cap:
        model(**inputs)
    (layer,) = [s.layer for s in handle.sites() if "mid_block" in s.qualname and s.qualname.endswith("attn1")]
    probs = [r for r in cap.records if r.layer == layer][0].probs  # [B, H, Q, K+3]
    q, k, v, ref_k, ref_v, bias = iv.seen[0]
    scale = q.shape[-1] ** -0.5
    scores = torch.cat([k, ref_k], 2)
    want = torch.softmax(q @ scores.transpose(-1, -2) * scale + bias, dim=-1)  # [B, H, Q, K+3]
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-4)
    assert float(probs[0, :, :, -3:].abs().max()) == 0.0  # the first row does not see the added keys
    assert float(probs[1, :, :, -1].abs().max()) == 0.0  # -inf bias: never attended
    assert float(probs[1, :, :, -2].min()) > 0.0  # +3 bias: attended


def test_edit_kv_runs_on_every_backend_and_fused_equals_eager():
    model = tiny_denoiser("sd3")
    inputs = denoiser_inputs("sd3")
    outs = {}
    for backend in ("eager", "torch"):
        with torch.no_grad(), attnkit.attach(model, [AppendKeys()], backend=backend) as handle:
            outs[backend] = model(**inputs)[0]
            assert {m["backend"] for m in handle.report()["modules"]} == {backend}
    torch.testing.assert_close(outs["torch"], outs["eager"], atol=1e-5, rtol=1e-4)
    assert all("edit_kv" in BACKENDS.get(name).capabilities for name in BACKENDS)


def test_same_shape_edit_on_some_heads_keeps_the_other_heads_own_keys():
    model = tiny_denoiser("unet")
    inputs = denoiser_inputs("unet")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    with torch.no_grad():
        with attnkit.attach(model, []) as handle, handle.capture(queries="all") as stock_cap:
            model(**inputs)
        with attnkit.attach(model, [SwapKeys(modules=name, heads=[0, 2])]) as handle, \
                handle.capture(queries="all") as cap:
            model(**inputs)
    layer = [s.layer for s in handle.sites() if s.qualname == name][0]
    stock = [r for r in stock_cap.records if r.layer == layer][0].probs  # [B, H, Q, K]
    edited = [r for r in cap.records if r.layer == layer][0].probs
    torch.testing.assert_close(edited[:, [1, 3]], stock[:, [1, 3]])  # untouched heads
    torch.testing.assert_close(edited[0], stock[0])  # row 0 reads its own keys anyway
    assert float((edited[1, [0, 2]] - stock[1, [0, 2]]).abs().max()) > 1e-3


def test_changing_the_key_count_on_some_heads_is_refused_with_one_sentence():
    model = tiny_denoiser("unet")
    with attnkit.attach(model, [AppendKeys(modules=r"mid_block.*attn1", heads=[0])]):
        with pytest.raises(ValueError, match="changed the key count on some heads only"):
            model(**denoiser_inputs("unet"))


def test_causal_language_model_keeps_causality_with_appended_keys():
    """Appended keys masked everywhere (-inf) leave a causal LM exactly stock: the merged mask kept causality (a
    lost causal mask would let every token see the future and change the logits)."""
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = model(ids).logits
        with attnkit.attach(model, [AppendKeys(bias=(float("-inf"),) * 3)]):
            masked = model(ids).logits
        with attnkit.attach(model, [AppendKeys(bias=(0.0, 0.0, 0.0), skip_first_row=False)]):
            visible = model(ids).logits
    torch.testing.assert_close(masked, stock, atol=1e-5, rtol=1e-5)
    assert float((visible - stock).abs().max()) > 1e-3


def test_merge_key_bias_by_hand():
    # causal 2x2, one appended key with bias +1 visible to both queries
    merged = merge_key_bias(None, torch.tensor([0.0, 0.0, 1.0]).view(1, 1, 1, 3), q_len=2, k_len0=2, k_len=3,
                            causal=True, device="cpu")
    assert merged[0, 0].tolist() == [[0.0, float("-inf"), 1.0], [0.0, 0.0, 1.0]]
    # a float model mask keeps its own values
    model_mask = torch.tensor([[0.0, -2.0]]).view(1, 1, 1, 2)
    merged = merge_key_bias(model_mask, None, q_len=1, k_len0=2, k_len=3, causal=False, device="cpu")
    assert merged.flatten().tolist() == [0.0, -2.0, 0.0]
    assert merge_key_bias(None, None, q_len=2, k_len0=2, k_len=2, causal=True, device="cpu") is None
    with pytest.raises(ValueError, match="removed keys"):
        merge_key_bias(None, None, q_len=2, k_len0=3, k_len=2, causal=True, device="cpu")


def test_added_keys_are_labelled_reference_for_later_hooks():
    seen = {}

    class Probe(attnkit.Intervention):
        name = "test-probe-reference"

        def edit_output(self, out, ctx):
            seen["reference"] = ctx.key_mask("reference")[0].tolist()
            seen["image"] = ctx.key_mask("image")[0].tolist()
            seen["k_len"], seen["orig"] = ctx.k_len, ctx.orig_k_len
            return out

    model = tiny_denoiser("unet")
    with torch.no_grad(), attnkit.attach(model, [AppendKeys(modules=r"mid_block.*attn1"),
                                                 Probe(modules=r"mid_block.*attn1")]):
        model(**denoiser_inputs("unet"))
    n = seen["orig"]
    assert seen["k_len"] == n + 3
    assert seen["reference"] == [False] * n + [True] * 3 and seen["image"] == [True] * n + [False] * 3
