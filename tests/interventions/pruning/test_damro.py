"""DAMRO: the logits rule by hand, merged-head [CLS] outliers from the ViT's q/k, the outlier-only branch's inputs,
KV-cache generation == a no-cache recomputation of the rule, batched == per-sample, preset."""

import math

import pytest
import torch

import attnkit
from attnkit.interventions.pruning._vision_cls import vision_layers
from attnkit.interventions.pruning.damro import Damro, damro_logits, select_outliers
from attnkit.testing import left_padded_llava_batch, tiny_vlm, vlm_inputs

IMAGE_ID = 120


@pytest.fixture(scope="module")
def llava():
    return tiny_vlm("llava")


def _mixed_batch(model):
    """Two llava samples of different lengths, the shorter one left-padded; and the samples alone."""
    return left_padded_llava_batch(model)


def _hand_outliers(model, pixel_values, k, vision_layer=-1, rule="merged"):
    """Top-k patches of the [CLS] row computed from the ViT layer's own q_proj / k_proj ([B, k], score order)."""
    attn = vision_layers(model)[vision_layer]
    seen = {}
    def grab(module, args, kwargs):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)  # [B, P+1, C] the layer's input

    hook = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model.model.get_image_features(pixel_values=pixel_values)
    hook.remove()
    x = seen["x"]  # [B, P+1, C]
    with torch.no_grad():
        q, kk = attn.q_proj(x), attn.k_proj(x)  # [B, P+1, C] raw projections
    c = q.shape[-1]
    if rule == "merged":  # one head over the full width, scale C^-1/2
        row = torch.softmax(torch.einsum("bc,bjc->bj", q[:, 0], kk) / math.sqrt(c), -1)  # [B, P+1]
    else:
        h = attn.num_heads
        qh, kh = q.view(*q.shape[:2], h, c // h), kk.view(*kk.shape[:2], h, c // h)
        row = torch.softmax(torch.einsum("bhd,bjhd->bhj", qh[:, 0], kh) / math.sqrt(c // h), -1).mean(1)
    patches = row[:, 1:]  # [B, P] ([CLS] column dropped)
    # plain-Python top-k: score-descending, ties → earlier patch
    top = [sorted(range(patches.shape[1]), key=lambda j: (-float(p[j]), j))[:k] for p in patches]
    return torch.tensor(top), patches


def _hand_branch_embeds(model, ids, pixel_values, outliers):
    """Per sample (no padding): text embeddings with the image span replaced by the outliers' projected features."""
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values)
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats  # [B, P, D]
        text = model.get_input_embeddings()(ids)  # [B, N, D]
    rows = []
    for b in range(ids.shape[0]):
        img = (ids[b] == IMAGE_ID).nonzero().flatten()
        first, last = int(img[0]), int(img[-1])
        rows.append(torch.cat([text[b, :first], feats[b, outliers[b]], text[b, last + 1:]]))
    return torch.stack(rows)


# ---- the rule ------------------------------------------------------------------------------------------------------
def test_worked_example_and_hand_rule():
    # METHODS.md §6: l_orig=[2,1,-1], l_outlier=[2.5,0,0], alpha=1, beta=0.1 → [1.5, 2.0, -inf], greedy picks 1
    out = damro_logits(torch.tensor([2.0, 1.0, -1.0]), torch.tensor([2.5, 0.0, 0.0]), alpha=1.0, beta=0.1)
    assert out[:2].tolist() == [1.5, 2.0] and out[2] == float("-inf")
    assert torch.allclose(out.softmax(-1), torch.tensor([0.3775, 0.6225, 0.0]), atol=1e-4) and int(out.argmax()) == 1
    # random case, elementwise by hand
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    alpha, beta = 0.5, 0.3
    got = damro_logits(a, b, alpha, beta)
    for idx in [(0, 0), (1, 3), (2, 4)]:
        cutoff = math.log(beta) + max(a[idx].tolist())
        for v in range(11):
            expect = float("-inf") if a[idx][v] < cutoff else (1 + alpha) * a[idx][v] - alpha * b[idx][v]
            assert got[idx][v].item() == pytest.approx(float(expect), abs=1e-5)
    assert torch.equal(damro_logits(a, b, 2.0, 0.0), 3 * a - 2 * b)  # beta = 0: no plausibility mask


def test_select_outliers_order_and_ties():
    s = torch.tensor([[0.2, 0.5, 0.2, 0.1, 0.5]])
    assert select_outliers(s, 3).tolist() == [[1, 4, 0]]  # score-descending, ties → earlier patch
    assert select_outliers(s, 3, order="raster").tolist() == [[0, 1, 4]]
    with pytest.raises(ValueError, match="k=6"):
        select_outliers(s, 6)


# ---- outliers and the branch -----------------------------------------------------------------------------------
@pytest.mark.parametrize("vision_layer,rule", [(None, "merged"), (0, "merged"), (None, "head_mean")])
def test_outliers_are_topk_of_hand_merged_cls_row(llava, vision_layer, rule):
    inputs = vlm_inputs("llava", llava, batch=2, left_pad=1)
    damro = Damro(k=5, vision_layer=vision_layer, cls_rule=rule)
    with torch.no_grad(), attnkit.attach(llava, [damro]):
        llava(**inputs)
    layer = -1 if vision_layer is None else vision_layer  # tiny llava: vision_feature_layer = -1
    expected, patches = _hand_outliers(llava, inputs["pixel_values"], 5, layer, rule)
    assert damro.last_outliers.tolist() == expected.tolist()
    if rule == "merged":  # pitfall: the per-head mean ranks the patches differently here
        mean_top, _ = _hand_outliers(llava, inputs["pixel_values"], 5, layer, "head_mean")
        assert mean_top.tolist() != expected.tolist()


def test_branch_sees_exactly_k_outliers_in_topk_order(llava):
    inputs = vlm_inputs("llava", llava, batch=2)
    n, k = inputs["input_ids"].shape[1], 4
    calls = []

    def record(module, args, kwargs):
        calls.append({key: kwargs.get(key) for key in ("inputs_embeds", "position_ids")})

    probe = llava.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad(), attnkit.attach(llava, [Damro(k=k)]) as handle:
            llava(**inputs)
            outliers = handle.interventions[0].last_outliers
    finally:
        probe.remove()
    assert len(calls) == 2  # the original pass, then the outlier-only branch
    branch = calls[1]["inputs_embeds"]  # [B, N - 16 + k, D]
    assert branch.shape[1] == n - 16 + k
    hand, patches = _hand_outliers(llava, inputs["pixel_values"], k)
    assert outliers.tolist() == hand.tolist()
    for b in range(2):  # scores of the branch's image tokens, in branch order, are non-increasing
        s = patches[b, outliers[b]]
        assert bool((s[:-1] >= s[1:]).all())
    expected = _hand_branch_embeds(llava, inputs["input_ids"], inputs["pixel_values"], outliers)
    torch.testing.assert_close(branch, expected)
    assert calls[1]["position_ids"].tolist() == [list(range(n - 16 + k))] * 2  # re-indexed, contiguous


# ---- generation -------------------------------------------------------------------------------------------------
def _reference_generate(model, sample, alpha, beta, k, steps):
    """No cache, no attnkit: recompute both branches over the whole prefix at each step and apply the rule."""
    ids, pixels = sample["input_ids"], sample["pixel_values"]
    outliers, _ = _hand_outliers(model, pixels, k)
    lm = model.model.language_model
    logits_per_step = []
    with torch.no_grad():
        for _ in range(steps):
            orig = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits[:, -1]  # [1, V]
            embeds = _hand_branch_embeds(model, ids, pixels, outliers)  # [1, N', D]
            hidden = lm(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
            outlier = model.lm_head(hidden)  # [1, V]
            combined = (1 + alpha) * orig - alpha * outlier
            combined[orig < math.log(beta) + orig.max(-1, keepdim=True).values] = float("-inf")
            logits_per_step.append(combined)
            ids = torch.cat([ids, combined.argmax(-1, keepdim=True)], 1)
    return ids[:, sample["input_ids"].shape[1]:], logits_per_step


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_equals_no_cache_recomputation_batched_left_padded(llava, use_cache):
    alpha, beta, k, steps = 1.0, 0.5, 4, 4
    batch, samples = _mixed_batch(llava)
    with torch.no_grad(), attnkit.attach(llava, [Damro(alpha=alpha, k=k, beta=beta)]):
        out = llava.generate(**batch, max_new_tokens=steps, do_sample=False, pad_token_id=0, use_cache=use_cache,
                             output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    masked = 0
    for b, sample in enumerate(samples):
        ref_tokens, ref_logits = _reference_generate(llava, sample, alpha, beta, k, steps)
        assert new[b].tolist() == ref_tokens[0].tolist()
        for t in range(steps):
            got, ref = out.logits[t][b], ref_logits[t][0]
            assert torch.equal(torch.isinf(got), torch.isinf(ref))
            torch.testing.assert_close(got[~torch.isinf(got)], ref[~torch.isinf(ref)], atol=2e-5, rtol=1e-4)
            masked += int(torch.isinf(got).sum())
    assert masked > 0  # the plausibility constraint was exercised


def test_batched_equals_per_sample(llava):
    batch, samples = _mixed_batch(llava)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    damro = Damro(alpha=2.0, k=3, beta=0.1)
    with torch.no_grad(), attnkit.attach(llava, [damro]):
        together = llava.generate(**batch, **kw)
        outliers = damro.last_outliers.clone()
        alone = []
        for s in samples:
            alone.append(llava.generate(**s, **kw))
            assert damro.last_outliers.shape == (1, 3)
            alone[-1].outliers = damro.last_outliers.clone()
    n = batch["input_ids"].shape[1]
    for b, (s, one) in enumerate(zip(samples, alone)):
        assert outliers[b].tolist() == one.outliers[0].tolist()
        assert together.sequences[b, n:].tolist() == one.sequences[0, s["input_ids"].shape[1]:].tolist()
        for t in range(3):
            torch.testing.assert_close(together.logits[t][b], one.logits[t][0], atol=2e-5, rtol=1e-4)


def test_full_forward_edits_only_the_text_after_the_image_and_remove_restores(llava):
    inputs = vlm_inputs("llava", llava, batch=2, left_pad=1)
    image = inputs["input_ids"] == IMAGE_ID
    with torch.no_grad():
        stock = llava(**inputs).logits
        with attnkit.attach(llava, [Damro(alpha=1.0, k=3, beta=0.0)]):
            edited = llava(**inputs).logits
        after = llava(**inputs).logits
    for b in range(2):  # the samples are padded differently: each has its own last image position
        last_img = int(image[b].nonzero().max())
        assert torch.equal(edited[b, : last_img + 1], stock[b, : last_img + 1])
        assert not torch.allclose(edited[b, last_img + 1:], stock[b, last_img + 1:])
    assert torch.equal(after, stock)


def test_text_only_prompt_is_unchanged_and_sampling_runs(llava):
    ids = torch.tensor([[0, 5, 7, 9, 11], [3, 4, 6, 8, 10]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1] * 5])
    with torch.no_grad():
        stock = llava(input_ids=ids, attention_mask=mask).logits
        with attnkit.attach(llava, [Damro()]):
            assert torch.equal(llava(input_ids=ids, attention_mask=mask).logits, stock)
            inputs = vlm_inputs("llava", llava, batch=2)
            torch.manual_seed(0)
            out = llava.generate(**inputs, max_new_tokens=3, pad_token_id=0, **Damro.sampling_kwargs())
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_bad_settings_raise_clear_errors(llava):
    with pytest.raises(ValueError, match="beta"):
        Damro(beta=2.0)
    with pytest.raises(ValueError, match="layers"):
        Damro(layers=[0])
    with pytest.raises(attnkit.api.AttachError, match="vision"):
        attnkit.attach(attnkit.testing.tiny_causal_lm("llama"), [Damro()])
    inputs = vlm_inputs("llava", llava, batch=1)
    with torch.no_grad(), attnkit.attach(llava, [Damro(k=17)]), pytest.raises(ValueError, match="k=17"):
        llava(**inputs)


def test_preset_loads_attaches_and_generates(llava):
    recipe = attnkit.load_recipe("damro")
    (damro,) = recipe.build_interventions()
    assert (damro.name, damro.alpha, damro.k, damro.beta, damro.cls_rule, damro.order) == \
        ("damro", 2.0, 10, 0.1, "merged", "score")
    inputs = vlm_inputs("llava", llava, batch=2, left_pad=1)
    with torch.no_grad(), attnkit.attach(llava, recipe) as handle:
        out = llava.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2 and handle.report()["recipe"] == "damro"


def test_docstring_examples_run():
    import doctest

    import attnkit.interventions.pruning.damro as module

    assert doctest.testmod(module).failed == 0


def test_beam_search_cache_follows_reorders(llava):
    batch, _ = _mixed_batch(llava)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=3, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    damro = Damro(alpha=1.0, k=4, beta=0.5)
    with torch.no_grad(), attnkit.attach(llava, [damro]):
        llava(**batch)
        per_sample = damro.last_outliers.clone()  # [2, k]
        cached = llava.generate(**batch, use_cache=True, **kw)
        fresh = llava.generate(**batch, use_cache=False, **kw)  # every step recomputes both branches
    assert torch.equal(damro.last_outliers, per_sample.repeat_interleave(3, dim=0))  # each beam: its sample's set
    assert cached.sequences.tolist() == fresh.sequences.tolist()
    torch.testing.assert_close(cached.sequences_scores, fresh.sequences_scores, atol=1e-4, rtol=1e-4)
