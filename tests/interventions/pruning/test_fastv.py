"""FastV and visual-token exit: the defining rule by hand, drop == mask, backends, batching, KV-cache decoding."""

import pytest
import torch

import attnkit
from attnkit.interventions.pruning._drop import keep_plan, top_fraction_keep
from attnkit.interventions.pruning.fastv import FastV
from attnkit.interventions.pruning.visual_exit import VisualExit
from attnkit.testing import left_padded_llava_batch, VISION_FAMILIES, tiny_vlm, vlm_inputs


@pytest.fixture(scope="module")
def llava():
    return tiny_vlm("llava")


def _mixed_batch(model):
    """Two llava samples of different lengths, the shorter one left-padded; and the samples alone."""
    return left_padded_llava_batch(model)


def test_worked_example_keeps_top_half_in_raster_order_with_original_positions():
    # METHODS.md §4: head-mean last-row attention over 6 image tokens starting at position 2, R = 0.5
    start, img = 2, torch.tensor([0.05, 0.20, 0.01, 0.10, 0.30, 0.02])
    scores = torch.zeros(1, 10)
    scores[0, start:start + 6] = img
    cand = torch.zeros(1, 10, dtype=torch.bool)
    cand[0, start:start + 6] = True
    keep = top_fraction_keep(scores, cand, keep_ratio=0.5)
    plan = keep_plan(keep, torch.ones(1, 10, dtype=torch.bool))
    kept_image = [int(i) - start for i in plan.index[0] if cand[0, i]]
    assert kept_image == [1, 3, 4]  # raster order
    assert plan.index[0].tolist() == [0, 1, start + 1, start + 3, start + 4, 8, 9]  # text kept, original positions


@pytest.mark.parametrize("rule", ["last", "all"])
def test_selection_matches_hand_computed_attention_and_positions_are_original(llava, rule):
    k, ratio = 1, 0.5
    batch, _ = _mixed_batch(llava)
    image = batch["input_ids"] == llava.config.image_token_id  # [B, N]
    real = batch["attention_mask"].bool()
    with torch.no_grad():  # reference: stock eager attention of layer k-1 (layers < k are untouched by FastV)
        llava.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
        ref = llava(**batch, output_attentions=True).attentions[k - 1].float()  # [B, H, N, N]
        llava.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    seen = {}
    with torch.no_grad(), attnkit.attach(llava, [FastV(k=k, ratio=ratio, rule=rule)]) as handle:
        layer_k = llava.model.language_model.layers[k]
        probe = layer_k.register_forward_pre_hook(lambda m, a, kw: seen.update(kw, hidden=a[0]), with_kwargs=True)
        llava(**batch)
        probe.remove()
        plan = handle.interventions[0]._dropper.plan
    for b in range(2):
        if rule == "last":
            s = ref[b, :, -1].mean(0)  # [N]
        else:
            s = (ref[b].mean(0) * real[b, :, None]).sum(0) / real[b].sum()
        img_idx = image[b].nonzero().flatten()
        n_keep = round(len(img_idx) * (1 - ratio))
        expected_img = sorted(img_idx[s[img_idx].topk(n_keep).indices].tolist())
        kept = plan.index[b][plan.slot_real[b]].tolist()
        assert [i for i in kept if image[b, i]] == expected_img
        assert [i for i in kept if not image[b, i]] == real[b].logical_and(~image[b]).nonzero().flatten().tolist()
    assert torch.equal(seen["position_ids"], plan.index)  # original position ids, gaps kept
    assert seen["hidden"].shape[1] == plan.index.shape[1] < batch["input_ids"].shape[1]


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_drop_equals_mask_path_on_every_vlm_family(family):
    model = tiny_vlm(family)
    inputs = vlm_inputs(family, model, batch=2, left_pad=2)
    with torch.no_grad():
        outs = {}
        for mode in ("drop", "mask"):
            with attnkit.attach(model, [FastV(k=1, ratio=0.5, mode=mode)]) as handle:
                outs[mode] = model(**inputs).logits[:, -1]
                if mode == "drop":
                    before, after = handle.interventions[0].last_counts
                    n_img = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
                    assert [b - a for b, a in zip(before, after)] == [n_img // 2] * 2
        stock = model(**inputs).logits[:, -1]
    assert torch.allclose(outs["drop"], outs["mask"], atol=1e-5)
    assert not torch.allclose(outs["drop"], stock, atol=1e-4)


def test_batched_equals_per_sample_with_left_padding(llava):
    batch, singles = _mixed_batch(llava)
    with torch.no_grad(), attnkit.attach(llava, [FastV(k=1, ratio=0.5)]):
        batched = llava(**batch).logits[:, -1]
        alone = torch.cat([llava(**s).logits[:, -1] for s in singles])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_fused_and_eager_backends_agree(llava):
    batch, _ = _mixed_batch(llava)
    with torch.no_grad():
        got = {}
        for mode in ("drop", "mask"):
            for backend in ("torch", "eager"):
                with attnkit.attach(llava, [FastV(k=1, ratio=0.25, mode=mode)], backend=backend) as handle:
                    got[mode, backend] = llava(**batch).logits[:, -1]
                    if mode == "mask":
                        assert {m["backend"] for m in handle.report()["modules"]} == {backend}
    ref = got["mask", "eager"]
    for value in got.values():
        assert torch.allclose(value, ref, atol=1e-5)


def test_generate_with_kv_cache_prunes_once_and_matches_mask_path(llava):
    batch, _ = _mixed_batch(llava)
    gen = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        res = {}
        for mode in ("drop", "mask"):
            with attnkit.attach(llava, [FastV(k=1, ratio=0.5, mode=mode)]):
                res[mode] = llava.generate(**batch, **gen)
    assert torch.equal(res["drop"].sequences, res["mask"].sequences)
    for a, b in zip(res["drop"].scores, res["mask"].scores):
        assert torch.allclose(a, b, atol=1e-4)


def test_visual_exit_drops_every_image_token(llava):
    batch, _ = _mixed_batch(llava)
    n_text = int((batch["input_ids"][0] != llava.config.image_token_id).sum())
    with torch.no_grad():
        with attnkit.attach(llava, [VisualExit(k=1)]):
            dropped = llava(**batch).logits
            tokens = llava.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with attnkit.attach(llava, [VisualExit(k=1, mode="mask")]):
            masked = llava(**batch).logits[:, -1]
            tokens_mask = llava.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert dropped.shape[1] == n_text
    assert torch.allclose(dropped[:, -1], masked, atol=1e-5)
    assert torch.equal(tokens, tokens_mask)


def test_invalid_settings_are_explained():
    with pytest.raises(ValueError, match="rule='random'"):
        FastV(k=0)
    with pytest.raises(ValueError, match="do not pass layers"):
        FastV(k=2, layers=[3])
    with pytest.raises(ValueError, match="k=5"):
        attnkit.attach(tiny_vlm("llava"), [FastV(k=5)])
