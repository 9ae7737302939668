"""VHR: head selection by hand (VHD > median), outputs × alpha, fused == eager, batching, KV cache, families."""

import pytest
import torch

import attnkit
from attnkit.interventions.steering.vhr import VHR, select_vision_heads, text_only_inputs
from attnkit.testing import VISION_FAMILIES, tiny_vlm, vlm_inputs


def test_worked_example_median_and_outlier_removal():
    vhd = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    assert select_vision_heads(vhd).nonzero()[:, 1].tolist() == [1, 2]
    ta = torch.tensor([[0.0, 5.0, 0.0, 0.0]])  # head 1 surges without the image: an outlier
    assert select_vision_heads(vhd, ta).nonzero()[:, 1].tolist() == [2, 3]


def _head_inputs(model, layer):
    """Records the per-head outputs entering o_proj of ``layer`` → list of [B, N, H*D]."""
    seen = []
    proj = model.model.language_model.layers[layer].self_attn.o_proj
    return seen, proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))


def test_layer0_selection_and_gain_match_hand_computation():
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=2, left_pad=1)
    H = model.config.text_config.num_attention_heads
    with torch.no_grad():
        seen, hook = _head_inputs(model, 0)
        model(**inputs)
        text_ids, text_mask = text_only_inputs(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id)
        model(input_ids=text_ids, attention_mask=text_mask)
        stock_img, stock_txt = seen[0], seen[1]  # [B, N, H*D]
        seen.clear()
        with attnkit.attach(model, [VHR(alpha=2.0, layers=[0])]) as handle:
            model(**inputs)
            selected = handle.interventions[0].selected[0]  # [B, H]
        hook.remove()
    steered = seen[-1]
    a = stock_img[:, -1].reshape(2, H, -1)
    t = stock_txt[:, -1].reshape(2, H, -1)
    want = select_vision_heads((a - t).norm(dim=-1), t.pow(2).sum(-1))
    assert torch.equal(selected, want) and selected.sum(1).tolist() == [H // 2 - int(w) for w in (~want).sum(1) - H // 2]
    gain = torch.where(want, 2.0, 1.0)[:, None, :, None]  # [B, 1, H, 1]
    B, N = stock_img.shape[:2]
    assert torch.allclose(steered.reshape(B, N, H, -1), stock_img.reshape(B, N, H, -1) * gain, atol=1e-6)


def test_fused_equals_eager_batched_equals_per_sample_and_generate():
    model = tiny_vlm("llava")
    a = vlm_inputs("llava", model, batch=1, text_len=6, seed=0)
    b = vlm_inputs("llava", model, batch=1, text_len=4, seed=1)
    batch = dict(input_ids=torch.cat([a["input_ids"], torch.cat([torch.zeros(1, 2, dtype=torch.long), b["input_ids"]], 1)]),
                 attention_mask=torch.cat([a["attention_mask"], torch.cat([torch.zeros(1, 2, dtype=torch.long),
                                                                          b["attention_mask"]], 1)]),
                 pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]))
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    out, res = {}, {}
    with torch.no_grad():
        for backend in ("torch", "eager"):
            with attnkit.attach(model, [VHR(alpha=2.0, layers=[0, 1])], backend=backend) as handle:
                out[backend] = model(**batch).logits[:, -1]
                alone = torch.cat([model(**s).logits[:, -1] for s in (a, b)])
                assert torch.allclose(out[backend], alone, atol=1e-5)
                res[backend] = model.generate(**batch, **gen)
                assert {m["backend"] for m in handle.report()["modules"]} == {backend}
        stock = model(**batch).logits[:, -1]
    assert torch.allclose(out["torch"], out["eager"], atol=1e-5)
    assert not torch.allclose(out["torch"], stock, atol=1e-4)
    assert torch.equal(res["torch"].sequences, res["eager"].sequences)
    for x, y in zip(res["torch"].scores, res["eager"].scores):
        assert torch.allclose(x, y, atol=1e-4)


def test_heads_are_selected_once_per_sequence_with_kv_cache():
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=2)
    calls = []
    with torch.no_grad(), attnkit.attach(model, [VHR(layers=[1])]) as handle:
        hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        hook.remove()
        assert handle.interventions[0].selected[1].shape == (2, 4)
    n, n_text = inputs["input_ids"].shape[1], int((inputs["input_ids"][0] != model.config.image_token_id).sum())
    assert calls == [n_text, n, 1, 1]  # the text-only pass runs inside the prefill call, then plain decode steps


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_runs_on_every_vlm_family(family):
    model = tiny_vlm(family)
    inputs = vlm_inputs(family, model, batch=2, left_pad=1)
    with torch.no_grad():
        stock = model(**inputs).logits[:, -1]
        with attnkit.attach(model, [VHR(alpha=2.0)]) as handle:
            steered = model(**inputs).logits[:, -1]
            assert handle.interventions[0].selected
    assert torch.isfinite(steered).all() and not torch.allclose(steered, stock, atol=1e-5)
