"""VAR: the METHODS.md worked example, conservation, conventions, the rule inside a tiny VLM, batching, KV cache."""

import pytest
import torch

import attnkit
from attnkit.interventions.sinks.var import VAR, var_factors
from attnkit.kernels.backends import BACKENDS
from attnkit.kernels.eager import reweight_groups
from attnkit.testing import tiny_vlm, vlm_inputs

A = torch.tensor([0.40, 0.15, 0.15, 0.10, 0.05, 0.15])
GROUPS = torch.tensor([2, 1, 3, 3, 3, 0])  # BOS text sink, v1 visual sink, v2..v4 image non-sinks, t


def _apply(row, groups, **kw):
    probs = row.view(1, 1, 1, -1)
    ones = torch.ones(1, dtype=torch.bool)
    return reweight_groups(probs, groups.view(1, -1), lambda m: var_factors(m, **kw), ones).view(-1)


def test_worked_example_through_group_reweighting():
    out = _apply(A, GROUPS, p=0.4, rho=0.5)
    assert torch.allclose(out, torch.tensor([0.24, 0.09, 0.26, 0.173333, 0.086667, 0.15]), atol=1e-6)
    assert torch.allclose(out.sum(), torch.tensor(1.0))
    assert torch.equal(_apply(A, GROUPS, p=0.4, rho=0.8), A)  # ratio 0.667 < 0.8: untouched
    # released-code parameters: p kept = 0.6, rho = max sink share 0.5 -> same row
    code = _apply(A, GROUPS, p=0.6, rho=0.5, convention="code", n_image=4)
    assert torch.allclose(code, out, atol=1e-6)


def test_conserves_rows_and_moves_exactly_p_of_sink_mass():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        row = torch.rand(12, generator=g) ** 3
        row = row / row.sum()
        groups = torch.randint(0, 4, (12,), generator=g)
        groups[:4] = torch.tensor([1, 2, 3, 3])
        out = _apply(row, groups, p=0.3, rho=0.0, min_image_mass=0.0)
        sink = (groups == 1) | (groups == 2)
        assert torch.allclose(out.sum(), torch.tensor(1.0), atol=1e-6)
        assert torch.allclose(out[sink], 0.7 * row[sink], atol=1e-7)
        moved = out[groups == 3].sum() - row[groups == 3].sum()
        assert torch.allclose(moved, 0.3 * row[sink].sum(), atol=1e-6)
        assert torch.allclose(out[groups == 0], row[groups == 0], atol=1e-7)
        img = row[groups == 3]
        assert torch.allclose(out[groups == 3] / img, (out[groups == 3] / img)[0].expand_as(img), atol=1e-5)


def test_layer_without_visual_sink_is_untouched_by_default_and_moved_under_the_paper_flag():
    # issue 13.1: other, image (0 attention), text sink (e.g. BOS), image; no visual sink in this layer
    row, groups = torch.tensor([0.30, 0.0, 0.40, 0.30]), torch.tensor([0, 3, 2, 3])
    none = torch.tensor([False])
    assert torch.equal(_apply(row, groups, p=0.4, rho=0.5, visual_sinks=none), row)  # released code
    assert torch.equal(_apply(row, groups, p=0.6, rho=0.5, convention="code", n_image=2, visual_sinks=none), row)
    moved = _apply(row, groups, p=0.4, rho=0.5)  # the paper's rule read literally: 0.4 x 0.40 goes to the image
    assert torch.allclose(moved, torch.tensor([0.30, 0.0, 0.24, 0.46]), atol=1e-7)
    # a layer that does have a visual sink is redistributed as before (worked example)
    out = _apply(A, GROUPS, p=0.4, rho=0.5, visual_sinks=torch.tensor([True]))
    assert torch.allclose(out, torch.tensor([0.24, 0.09, 0.26, 0.173333, 0.086667, 0.15]), atol=1e-6)


def _text_only_sink_setting(model, inputs, layer=1):
    """(dims, tau) under which the stock input of ``layer`` has text sinks and no visual sink in any sample."""
    from attnkit.hooks.transformers import text_model_of
    from attnkit.interventions.sinks.detect import sink_dim_values

    seen = {}

    def keep(module, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)  # [B, N, D]

    hook = text_model_of(model).layers[layer].register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    image = inputs["input_ids"] == model.config.image_token_id
    text = inputs["attention_mask"].bool() & ~image
    for d in range(seen["h"].shape[-1]):
        phi = sink_dim_values(seen["h"], [d])  # [B, N]
        top_image, top_text = phi[image].max(), phi[text].max()
        if top_text > top_image + 0.2:
            return [d], float(top_image + top_text) / 2
    raise AssertionError("no dimension separates text from image tokens")


def test_no_visual_sink_inside_a_tiny_vlm_leaves_the_layer_stock_unless_the_paper_flag():
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=2, left_pad=2)
    dims, tau = _text_only_sink_setting(model, inputs)
    with attnkit.attach(model, [], backend="eager") as h, h.capture(layers=[1], queries="all") as cap, torch.no_grad():
        model(**inputs)
    stock = cap.last(1)
    kw = dict(tau=tau, sink_dims=dims, rho=0.3, min_image_mass=0.05, first_layer=0, except_last_layer=False,
              layers=[1])
    outs = {}
    for require in (True, False):
        iv = VAR(require_visual_sink=require, **kw)
        with attnkit.attach(model, [iv], backend="eager") as h, h.capture(layers=[1], queries="all") as cap, \
                torch.no_grad():
            model(**inputs)
        outs[require] = cap.last(1)
        sinks = iv._sinks[1][1]
    image = inputs["input_ids"] == model.config.image_token_id
    assert sinks.any() and not (sinks & image).any(), "the setting must give text sinks only"
    assert torch.allclose(outs[True], stock, atol=1e-7, rtol=0)  # (renormalised by Σ M_g = 1 ± 1 ulp)
    groups = torch.zeros_like(inputs["input_ids"])
    groups[image], groups[sinks] = 3, 2
    text_rows = inputs["attention_mask"].bool() & ~image
    b, q = text_rows.nonzero()[-1].tolist()
    for hh in range(stock.shape[1]):
        want = _apply(stock[b, hh, q], groups[b], p=0.4, rho=0.3, min_image_mass=0.05)
        assert torch.allclose(outs[False][b, hh, q], want, atol=1e-5)
    assert not torch.allclose(outs[False], stock, atol=1e-4)


def test_sink_dims_must_be_given_and_auto_dims_are_per_sample_and_per_sequence():
    model = tiny_vlm("llava")
    with pytest.raises(attnkit.AttachError, match="sink dimensions"):
        attnkit.attach(model, [VAR()])
    a = vlm_inputs("llava", model, batch=2, seed=0)
    b = vlm_inputs("llava", model, batch=1, seed=3)
    iv = _var(rho=0.3, min_image_mass=0.05)
    with attnkit.attach(model, [iv], backend="eager"), torch.no_grad():
        model(**a)
        first = iv.last_auto_dims.clone()
        model(**b)
        second = iv.last_auto_dims.clone()
        model(**{k: v[1:2] for k, v in a.items()})
        third = iv.last_auto_dims.clone()
    assert first.shape == (2, 2) and second.shape == (1, 2)  # chosen afresh for every sequence
    assert torch.equal(third[0], first[1])  # sample 1 alone picks its own dimensions, as it did inside the batch


def test_image_mass_floor():
    row = torch.tensor([0.85, 0.05, 0.05, 0.05])
    assert torch.equal(_apply(row, torch.tensor([2, 3, 3, 0]), p=0.4, rho=0.5), row)  # image mass 0.1 < 0.2


def _var(**kw):
    base = dict(tau=1.5, first_layer=0, except_last_layer=False, sink_dims="auto")
    base.update(kw)
    return VAR(**base)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_rule_inside_tiny_vlm(family):
    """Edited rows = the hand rule applied to stock rows with the sinks VAR detected (captured on eager)."""
    model = tiny_vlm(family)
    inputs = vlm_inputs(family, model, batch=2, left_pad=2)
    with attnkit.attach(model, [], backend="eager") as h, h.capture(layers=[1], queries="all") as cap, torch.no_grad():
        ref_logits = model(**inputs).logits
    stock = cap.last(1)  # [B, H, N, N]
    iv = _var(rho=0.3, min_image_mass=0.05, layers=[1])  # layer 1 only: its input equals the stock one
    with attnkit.attach(model, [iv], backend="eager") as h, h.capture(layers=[1], queries="all") as cap, torch.no_grad():
        logits = model(**inputs).logits
    edited = cap.last(1)
    sinks = iv._sinks[1][1]  # [B, N]
    image = inputs["input_ids"] == model.config.image_token_id
    real = inputs["attention_mask"].bool()
    assert sinks.any() and (sinks & image).any(), "test needs visual and text sinks"
    groups = torch.zeros_like(inputs["input_ids"])
    groups[image] = 3
    groups[sinks & ~image] = 2
    groups[sinks & image] = 1
    text_rows = real & ~image
    changed = 0
    for b in range(2):
        for q in range(stock.shape[2]):
            if not text_rows[b, q] or not (sinks[b] & image[b]).any():  # released code: no visual sink, untouched
                assert torch.allclose(edited[b, :, q], stock[b, :, q], atol=1e-6)
                continue
            for hh in range(stock.shape[1]):
                want = _apply(stock[b, hh, q], groups[b], p=0.4, rho=0.3, min_image_mass=0.05)
                assert torch.allclose(edited[b, hh, q], want, atol=1e-5)
                changed += int(not torch.allclose(want, stock[b, hh, q]))
    assert changed > 0 and not torch.allclose(logits, ref_logits)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batched_equals_per_sample_with_left_padding(family):
    model = tiny_vlm(family)
    inputs = vlm_inputs(family, model, batch=2, left_pad=3)
    iv = _var(rho=0.3, min_image_mass=0.05)
    with attnkit.attach(model, [iv], backend="eager"), torch.no_grad():
        batched = model(**inputs).logits
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            single = {k: v[b : b + 1] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
            single = {k: v[:, real] if v.dim() == 2 and v.shape[1] == real.shape[0] else v for k, v in single.items()}
            if family == "qwen2_vl":
                n = inputs["pixel_values"].shape[0] // 2
                single.update(pixel_values=inputs["pixel_values"][b * n : (b + 1) * n],
                              image_grid_thw=inputs["image_grid_thw"][b : b + 1])
            else:
                single["pixel_values"] = inputs["pixel_values"][b : b + 1]
            alone = model(**single).logits
            assert torch.allclose(batched[b, real], alone[0], atol=1e-4), (b, (batched[b, real] - alone[0]).abs().max())


def test_generate_with_cache_equals_no_cache_recomputation():
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=1)
    iv = _var(rho=0.3, min_image_mass=0.05, sink_dims=[3, 17], tau=2.5)
    with attnkit.attach(model, [iv], backend="eager"), torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        prompt_sinks = {k: v[1].clone() for k, v in iv._sinks.items()}
        seq = gen.sequences
        full = model(input_ids=seq, attention_mask=torch.ones_like(seq), pixel_values=inputs["pixel_values"]).logits
    n = inputs["input_ids"].shape[1]
    for layer, sinks in iv._sinks.items():  # the definition matches only if generated tokens are no sinks
        assert torch.equal(sinks[1][:, :n], prompt_sinks[layer]) and not sinks[1][:, n:].any()
    for step, scores in enumerate(gen.scores):
        assert torch.allclose(scores[0], full[0, n - 1 + step], atol=1e-4)


def test_parity_with_fast_backend():
    if "group_factors" not in BACKENDS.get("torch").capabilities:
        pytest.skip("torch backend has no group_factors yet (kernels/grouped.py not registered); eager only")
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=2, left_pad=2)
    outs = []
    for backend in ("eager", "torch"):
        with attnkit.attach(model, [_var(rho=0.3, min_image_mass=0.05)], backend=backend), torch.no_grad():
            outs.append(model(**inputs).logits)
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
