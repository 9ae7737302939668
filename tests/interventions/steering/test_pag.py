"""Perturbed-attention guidance: the identity rule on hand-checkable cases, parity with diffusers' own PAG pipeline
and joint-attention processors, layer matching, presets."""

import re

import pytest
import torch

import attnkit
from attnkit.interventions.steering.pag import (
    PerturbedAttentionGuidance as PAG,
    fold_guidance,
    pag_scale_at,
    resolve_pag_layers,
)
from attnkit.testing import denoiser_inputs, tiny_denoiser

MID_SELF = "mid_block.attentions.0.transformer_blocks.0.attn1"


# ---- the defining rule ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "pag-only"])
def test_unet_perturbed_branch_outputs_values_and_other_branches_untouched(cfg):
    model = tiny_denoiser("unet")
    inputs = denoiser_inputs("unet", batch=2 if cfg else 1)
    n = inputs["sample"].shape[0]
    attn = dict(model.named_modules())[MID_SELF]
    seen = {}
    hook = attn.register_forward_hook(lambda m, a, kw, out: seen.update(x=a[0], out=out), with_kwargs=True)
    with torch.no_grad():
        stock = model(**inputs).sample  # [n, 4, 8, 8]
        pag = PAG(applied_layers="mid", guidance_scale=5.0 if cfg else None, cfg=cfg, return_branches=True)
        with attnkit.attach(model, pag) as handle, handle.capture(queries="all") as cap:
            branches = model(**inputs).sample  # [n + n_cond, 4, 8, 8]
        hook.remove()
        n_cond = n // 2 if cfg else n
        assert branches.shape[0] == n + n_cond
        x, out = seen["x"], seen["out"]  # [n + n_cond, N, C] at the perturbed layer
        torch.testing.assert_close(x[n:], x[n - n_cond: n], atol=0, rtol=0)  # same input up to the perturbed layer
        identity_out = attn.to_out[0](attn.to_v(x[n:]))  # attention output = V, then the output projection
        torch.testing.assert_close(out[n:], identity_out, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(out[n:], out[n - n_cond: n], atol=1e-3)
    torch.testing.assert_close(branches[:n], stock, atol=1e-5, rtol=1e-5)  # unperturbed rows untouched
    assert (branches[n:] - branches[n - n_cond: n]).abs().max() > 1e-3
    layer = handle.description.component("denoiser").names.index(MID_SELF)
    probs = cap.last(layer)  # [n + n_cond, H, Q, Q]
    eye = torch.eye(probs.shape[-1]).expand_as(probs[n:])
    assert torch.equal(probs[n:], eye)
    assert [m["module"] for m in handle.report()["modules"]] == [MID_SELF]


def test_fold_reproduces_pipeline_formulas():
    u, c, p = torch.randn(3, 5).unbind(0)
    w, s = 7.5, 3.0
    torch.testing.assert_close(u + w * (fold_guidance(c, p, s, w) - u), u + w * (c - u) + s * (c - p))
    torch.testing.assert_close(fold_guidance(c, p, s, 1.0), c + s * (c - p))
    assert pag_scale_at(3.0, 0.005, 600.0) == 1.0 and pag_scale_at(3.0, 0.005, 0.0) == 0.0


# ---- parity with diffusers' StableDiffusionPAGPipeline ----------------------------------------------------------------
@pytest.mark.parametrize("guidance, layers, adaptive", [
    (5.0, ["mid"], 0.0),
    (1.0, ["mid"], 0.0),  # PAG only: c + s(c − p)
    (5.0, ["down", "mid", "up"], 0.0),
    (5.0, ["mid"], 0.003),  # adaptive scale (timesteps ≤ 100 in the tiny scheduler)
], ids=["cfg-mid", "pag-only", "cfg-all-regions", "adaptive"])
def test_matches_diffusers_pag_pipeline(sd_pipe, guidance, layers, adaptive):
    from diffusers import StableDiffusionPAGPipeline

    reference = StableDiffusionPAGPipeline(**sd_pipe.components, pag_applied_layers=layers)
    reference.set_progress_bar_config(disable=True)
    prompts = ["a cat", "a red car"]  # batch > 1
    common = dict(num_inference_steps=3, guidance_scale=guidance, height=16, width=16, output_type="latent")
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        expected = reference(prompts, pag_scale=3.0, pag_adaptive_scale=adaptive, generator=seed(), **common).images
        plain = sd_pipe(prompts, generator=seed(), **common).images
        with attnkit.attach(sd_pipe, PAG(scale=3.0, adaptive_scale=adaptive, applied_layers=layers)):
            ours = sd_pipe(prompts, generator=seed(), **common).images
        after = sd_pipe(prompts, generator=seed(), **common).images
    assert (expected - plain).abs().max() > 1e-2  # PAG changes the result …
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)  # … exactly as diffusers does
    assert torch.equal(after, plain)  # and removing it restores the stock pipeline


# ---- joint attention ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "pag-only"])
def test_sd3_joint_matches_diffusers_pag_joint_processor(block, cfg):
    from diffusers.models.attention_processor import PAGCFGJointAttnProcessor2_0, PAGJointAttnProcessor2_0

    model = tiny_denoiser("sd3")
    inputs = denoiser_inputs("sd3", batch=2 if cfg else 1)
    n = inputs["hidden_states"].shape[0]
    rows = slice(n // 2, n) if cfg else slice(0, n)
    tripled = {k: torch.cat([v, v[rows]]) if torch.is_tensor(v) and v.dim() else v for k, v in inputs.items()}
    attn = model.transformer_blocks[block].attn
    with torch.no_grad():
        pag = PAG(applied_layers=f"transformer_blocks.{block}", guidance_scale=5.0 if cfg else None, cfg=cfg,
                  return_branches=True)
        with attnkit.attach(model, pag):
            ours = model(**inputs).sample
        original = attn.processor
        attn.set_processor(PAGCFGJointAttnProcessor2_0() if cfg else PAGJointAttnProcessor2_0())
        expected = model(**tripled).sample
        attn.set_processor(original)
        stock = model(**tripled).sample
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (expected[n:] - stock[n:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_joint_identity_rule_on_captured_maps(family):
    """Perturbed rows: image queries see only themselves among image keys plus every text key (renormalised);
    text queries attend normally. Checked in the first layer, where both branches have the same inputs."""
    model = tiny_denoiser(family)
    inputs = denoiser_inputs(family, batch=1)
    with torch.no_grad(), attnkit.attach(model, PAG(applied_layers=None, cfg=False, return_branches=True)) as handle:
        with handle.capture(layers=[0], queries="all") as cap:
            out = model(**inputs).sample
    probs = cap.last(0)  # [2, H, N, N]: row 0 normal, row 1 perturbed
    n_text = inputs["encoder_hidden_states"].shape[1]
    n = probs.shape[-1]
    text = torch.zeros(n, dtype=torch.bool)
    text[slice(0, n_text) if family == "flux" else slice(n - n_text, n)] = True  # Flux [text, image]; SD3 [image, text]
    image = ~text
    normal, perturbed = probs[0], probs[1]  # [H, N, N]
    allowed = text[None, :] | torch.eye(n, dtype=torch.bool)  # [N, N] for an image query
    expected = torch.where(allowed, normal, 0.0)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(perturbed[:, image], expected[:, image], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(perturbed[:, text], normal[:, text], atol=1e-6, rtol=1e-5)
    assert out.shape[0] == 2


# ---- layer matching ----------------------------------------------------------------------------------------------------
def test_layer_patterns_strict_by_default_and_diffusers_compatible_on_request(sd_pipe):
    names = [f"transformer_blocks.{i}.attn" for i in range(24)]
    kinds = ["joint"] * 24
    assert resolve_pag_layers(names, kinds, "blocks.1") == [1]
    assert resolve_pag_layers(names, kinds, "blocks.1", match="diffusers") == [1] + list(range(10, 20))
    assert resolve_pag_layers(names, kinds, r"blocks\.(2|13)\.") == [2, 13]
    with pytest.raises(ValueError, match="matches no self-attention"):
        resolve_pag_layers(names, kinds, "down.block_1")
    # on the UNet: the same modules diffusers' own matcher picks; cross-attention (attn2) is never chosen
    handle = attnkit.attach(sd_pipe, [])
    info = handle.description.component("denoiser")
    handle.remove()
    for pattern in ("mid", "up", "down_blocks.0", "blocks.1"):
        ours = [info.names[i] for i in resolve_pag_layers(info.names, info.kinds, pattern, "diffusers")]
        theirs = [name for name, m in sd_pipe.unet.named_modules()
                  if type(m).__name__ == "Attention" and not m.is_cross_attention and re.search(pattern, name)]
        assert sorted(ours) == sorted(theirs) and all(name.endswith("attn1") for name in ours)


def test_bad_parameters_raise():
    with pytest.raises(ValueError):
        PAG(scale=-1.0)
    with pytest.raises(ValueError):
        PAG(match="fuzzy")
    with pytest.raises(attnkit.AttachError):
        attnkit.attach(tiny_denoiser("unet"), PAG(applied_layers="mid", layers=[0]))  # intersection is empty


# ---- presets -----------------------------------------------------------------------------------------------------------
def test_pag_preset_loads_attaches_and_guides(sd_pipe):
    from attnkit.recipes import load_recipe

    recipe = load_recipe("pag-sd")
    common = dict(num_inference_steps=2, guidance_scale=5.0, height=16, width=16, output_type="latent")
    with torch.no_grad():
        plain = sd_pipe("a cat", generator=torch.Generator().manual_seed(0), **common).images
        with attnkit.attach(sd_pipe, recipe) as handle:
            guided = sd_pipe("a cat", generator=torch.Generator().manual_seed(0), **common).images
            with handle.disabled():  # no extra branch, no fold
                disabled = sd_pipe("a cat", generator=torch.Generator().manual_seed(0), **common).images
    torch.testing.assert_close(disabled, plain, atol=1e-6, rtol=1e-6)
    assert handle.report()["calls"]["pag"] == 2
    assert (guided - plain).abs().max() > 1e-2


def test_refuses_language_models():
    from attnkit.testing import tiny_causal_lm

    with pytest.raises(attnkit.AttachError, match="diffusers"):
        attnkit.attach(tiny_causal_lm("llama"), PAG())
