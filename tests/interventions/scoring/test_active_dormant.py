"""Active/dormant heads: the worked example, value norms against v_proj/o_proj read directly, the BOS ablation equal
to a one-hot edit of the probabilities, and loss deltas."""

import pytest
import torch

import attnkit
from attnkit.interventions.base import Intervention
from attnkit.interventions.scoring.active_dormant import HeadAblation, ablation_deltas, dormant_heads, dormant_mask, \
    head_entropies, residual_norms, sink_masses, value_norms
from attnkit.testing import tiny_causal_lm

A = torch.tensor([[1, 0, 0, 0], [.7, .3, 0, 0], [.6, .2, .2, 0], [.5, .1, .1, .3]])


def test_worked_example():
    R, C = head_entropies(A[None])
    assert abs(float(R) - 0.64725) < 1e-5 and abs(float(C) - 0.97528) < 1e-5
    assert dormant_mask(R, C, r_th=0.7, c_th=0.9).tolist() == [True]
    assert dormant_mask(R, C, r_th=0.6, c_th=0.9).tolist() == [False]
    masses = sink_masses(A)
    assert abs(float(masses["sink"]) - 2.8 / 4) < 1e-6 and abs(float(masses["top1"]) - 0.7) < 1e-6
    assert abs(float(masses["top2"]) - 1.0) < 1e-6  # 0.7 + 0.3 (the last column)


def test_value_norms_and_residuals_by_hand():
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    seen = {}
    hook = model.model.layers[1].self_attn.v_proj.register_forward_hook(lambda m, i, o: seen.setdefault("v", o))
    norms = value_norms(model, {"input_ids": ids})
    hook.remove()
    attn = model.model.layers[1].self_attn
    v = seen["v"].view(1, 5, 2, 16).transpose(1, 2).repeat_interleave(2, 1)  # [B, H, T, D]
    for h in range(4):
        want = (v[0, h] @ attn.o_proj.weight[:, h * 16:(h + 1) * 16].T).norm(dim=-1)
        assert torch.allclose(norms[1, 0, h], want, atol=1e-5)
    res = residual_norms(model, {"input_ids": ids})
    assert res.shape == (2, 1, 5)


class OneHotFirst(Intervention):
    name = "test-one-hot-first"

    def edit_probs(self, probs, ctx):
        real = ctx.key_mask("real").float()
        first = torch.nn.functional.one_hot(real.argmax(-1), probs.shape[-1]).float()  # [B, K]
        return first[:, None, None, :].expand_as(probs)


def test_bos_ablation_equals_a_one_hot_probability_edit():
    model = tiny_causal_lm("qwen2")
    ids = torch.tensor([[0, 0, 5, 7, 9, 11], [3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        with attnkit.attach(model, [HeadAblation("bos", layers=[1], heads=[0, 3])]):
            got = model(ids, attention_mask=mask).logits
        with attnkit.attach(model, [OneHotFirst(layers=[1], heads=[0, 3])], backend="eager"):
            want = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)


def test_ablation_deltas_and_dormant_scores():
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    deltas = ablation_deltas(model, {"input_ids": ids}, mode="zero", layers=[1])
    assert torch.isnan(deltas.scores[0]).all() and not torch.isnan(deltas.scores[1]).any()
    with attnkit.attach(model, [HeadAblation("zero", layers=[1], heads=[2])]), torch.no_grad():
        loss = float(model(ids, labels=ids).loss)
    assert abs(float(deltas.scores[1, 2]) - (loss - deltas.params["base_loss"])) < 1e-6
    hs = dormant_heads(model, {"input_ids": ids}, r_th=2.0, c_th=-1.0)
    assert hs.selected.all()  # thresholds that flag everything
    with pytest.raises(ValueError, match="mode"):
        HeadAblation("one-hot")
