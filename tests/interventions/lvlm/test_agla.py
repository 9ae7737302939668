"""AGLA-style augmented view: the logits rule and masks by hand, and generation equal to a hand-run pair of passes
(relevance from a separate capture, pixels masked by hand, two caches, combined greedily)."""

import math

import pytest
import torch

import attnkit
from attnkit.hooks.compat import cache_kwargs, output_cache
from attnkit.interventions.lvlm.agla import AGLA, agla_logits, keep_top, mask_pixels
from attnkit.testing import tiny_vlm, vlm_inputs


def test_rules_by_hand():
    out = agla_logits(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 5.0]), 1.0, 0.3)
    assert out.tolist() == [2.0, 3.0, float("-inf")]  # log 0.3 + 2 = 0.796 cuts the last token
    assert torch.equal(agla_logits(torch.tensor([1.0, -5.0]), torch.tensor([1.0, 1.0]), 2.0, 0.0),
                       torch.tensor([3.0, -3.0]))
    assert keep_top(torch.tensor([[0.1, 0.4, 0.3, 0.2]]), 0.5).tolist() == [[False, True, True, False]]
    assert keep_top(torch.tensor([[0.2, 0.2, 0.1]]), 0.34).tolist() == [[True, True, False]]  # ceil(1.02) = 2
    pixels = torch.ones(1, 3, 4, 4)
    masked = mask_pixels(pixels, torch.tensor([[True, False, False, True]]), (2, 2), fill=-1.0)
    assert masked[0, 0].tolist() == [[1, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [-1, -1, 1, 1]]
    rows = mask_pixels(torch.ones(8, 5), torch.tensor([[False, True]]), (1, 2), 0.0, torch.tensor([[1, 2, 4]]))
    assert rows.sum(1).tolist() == [0, 0, 0, 0, 5, 5, 5, 5]  # merged token k = rows 4k..4k+3


def hand_agla(model, inputs, layer, keep, alpha, beta, steps):
    """Two passes by hand: relevance of the prompt's last row at ``layer``, masked pixels, two caches."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with attnkit.attach(model, []) as h, h.capture(layers=[layer], queries="last") as cap, torch.no_grad():
        model(**inputs)
    row = cap.last(layer)[:, :, -1].mean(1)  # [B, K]
    image = ids == model.config.image_token_id
    relevance = torch.stack([row[b, image[b]] for b in range(ids.shape[0])])
    n = relevance.shape[1]
    order = relevance.argsort(dim=-1, descending=True, stable=True)[:, :math.ceil(keep * n)]
    kept = torch.zeros_like(relevance, dtype=torch.bool).scatter_(-1, order, True)
    side = int(math.isqrt(n))
    cell = inputs["pixel_values"].shape[-1] // side
    augmented = inputs["pixel_values"].clone()
    for b in range(ids.shape[0]):
        for t in range(n):
            if not kept[b, t]:
                r, c = divmod(t, side)
                augmented[b, :, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 0.0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    combined = []
    with torch.no_grad():
        main = model(**inputs, position_ids=positions, **cache_kwargs(model, None))
        branch = model(input_ids=ids, attention_mask=mask, pixel_values=augmented, position_ids=positions,
                       **cache_kwargs(model, None))
        for _ in range(steps):
            logits = agla_logits(main.logits[:, -1], branch.logits[:, -1], alpha, beta)
            combined.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            pos = (mask.cumsum(-1) - 1)[:, -1:]
            main = model(input_ids=nxt, attention_mask=mask, position_ids=pos, **cache_kwargs(model, output_cache(main)))
            branch = model(input_ids=nxt, attention_mask=mask, position_ids=pos,
                           **cache_kwargs(model, output_cache(branch)))
    return torch.stack(combined), kept


def test_generation_equals_two_passes_by_hand():
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=2, left_pad=2)
    want, kept = hand_agla(model, inputs, layer=1, keep=0.5, alpha=1.0, beta=0.1, steps=3)
    agla = AGLA(layer=1, keep=0.5, alpha=1.0, beta=0.1)
    with attnkit.attach(model, [agla]), torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True).logits
    assert torch.equal(agla.last_keep, kept)
    got = torch.stack(got)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and torch.allclose(got[finite], want[finite], atol=1e-4)


def test_qwen2_vl_decodes_and_neutral_alpha_is_stock():
    model = tiny_vlm("qwen2_vl")
    inputs = vlm_inputs("qwen2_vl", model, batch=2, left_pad=2)
    with torch.no_grad():
        stock = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with attnkit.attach(model, [AGLA(layer=1, alpha=0.0, beta=0.0)]):
            same = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        agla = AGLA(layer=1, keep=0.5, alpha=3.0, beta=0.0)
        with attnkit.attach(model, [agla]):
            model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(stock, same)
    assert agla.last_keep.sum(-1).tolist() == [2, 2]  # 4 merged tokens, half kept


def test_refusals():
    with pytest.raises(ValueError, match="keep"):
        AGLA(keep=0.0)
    with pytest.raises(attnkit.AttachError, match="layer 9"):
        attnkit.attach(tiny_vlm("llava"), [AGLA(layer=9)])
