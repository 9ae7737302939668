"""StyleID: the worked example of its rule, the injected maps against a hand computation from the stores, the
default layers (SD-1.x output blocks 6-11), and the whole protocol on every tiny image pipeline family."""

import diffusers
import pytest
import torch

import attnkit
from attnkit.diffusion.inject import blend_queries, scale_queries
from attnkit.diffusion.inversion import ddim_invert, encode
from attnkit.diffusion.store import AttentionStore
from attnkit.hooks.diffusers import DiffusersAdapter
from attnkit.interventions.editing._common import block_index_layers, late_self_layers
from attnkit.interventions.editing.styleid import StyleID, transfer
from attnkit.testing import tiny_pipeline

LAYER = "up_blocks.1.attentions.1.transformer_blocks.0.attn1"


def test_worked_example():
    """METHODS-2.md §5.1 prints [0.629558, 0.370442] and [0.587470, 0.412530]; the exact values (float64) are
    [0.629560, 0.370440] and [0.587479, 0.412521] — the spec's last digits are rounding slips."""
    q = blend_queries(torch.tensor([0.0, 1.0]).view(1, 1, 1, 2), torch.tensor([1.0, 0.0]).view(1, 1, 1, 2), 0.75)
    assert q.flatten().tolist() == [0.75, 0.25]
    k = torch.eye(2).view(1, 1, 2, 2)
    for tau, want in ((1.5, [0.629560, 0.370440]), (1.0, [0.587479, 0.412521])):
        scores = scale_queries(q, tau) @ k.transpose(-1, -2) * 2 ** -0.5
        assert torch.softmax(scores, -1).flatten().tolist() == pytest.approx(want, abs=1e-6)


def test_default_layers_are_sd1_output_blocks_6_to_11():
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 32, 32), layers_per_block=2, norm_num_groups=32,
        cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)  # SD-1.x layout
    description = DiffusersAdapter(unet).description
    names = description.component().names
    want = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b in (2, 3) for a in range(3)]
    assert [names[i] for i in late_self_layers(description)] == want
    assert [names[i] for i in block_index_layers(description, 10, 16)] == want  # MasaCtrl's blocks 10-15
    assert names[block_index_layers(description, 6, 7)[0]].startswith("mid_block")  # block 6 = mid


def test_injected_maps_equal_a_hand_computation_from_the_stores():
    pipe = tiny_pipeline("sd")
    content = encode(pipe, torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    style = encode(pipe, torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    store_c, store_s = AttentionStore(tensors=("q",)), AttentionStore(tensors=("k", "v"))
    inv_c = ddim_invert(pipe, content, num_inference_steps=4, record=store_c)
    ddim_invert(pipe, style, num_inference_steps=4, record=store_s)
    current = AttentionStore(tensors=("q",), modules=LAYER)  # records the stylised pass's own queries first
    method = StyleID(gamma=0.75, tau=1.5, content=store_c, style=store_s, modules=LAYER)
    with torch.no_grad(), attnkit.attach(pipe, [current, method]) as handle:
        with handle.capture(queries="all") as cap:
            pipe("", latents=inv_c.final, num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    layer = [s.layer for s in handle.sites() if s.qualname == LAYER][0]
    records = [r for r in cap.records if r.layer == layer]
    assert method.injected_calls == 4 and len(records) == 4
    for record, t in zip(records, sorted(store_c.timesteps(), reverse=True)):
        q_c, q_cs = store_c.get(LAYER, t, "q"), current.get(LAYER, t, "q")
        k_s = store_s.get(LAYER, t, "k")
        q = 1.5 * (0.75 * q_c + 0.25 * q_cs)
        want = torch.softmax(q @ k_s.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # [1, H, N, N]
        torch.testing.assert_close(record.probs, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["sd", "sd3", "flux", "pixart"])
def test_transfer_runs_on_every_image_family(family):
    pipe = tiny_pipeline(family)
    size = 8 if family == "sd" else 16
    g = torch.Generator().manual_seed(0)
    content, style = (torch.rand(1, 3, size, size, generator=g) * 2 - 1 for _ in range(2))
    extra = {"use_resolution_binning": False} if family == "pixart" else {}
    out = transfer(pipe, content, style, num_inference_steps=4, **extra)
    assert out.injected_calls > 0 and torch.isfinite(out.images).all()
    assert out.images.shape == (1, 3, size, size)
    assert set(out.content_store.memory()["by_tensor"]) == {"q"}
    assert set(out.style_store.memory()["by_tensor"]) == {"k", "v"}
    plain = transfer(pipe, content, style, num_inference_steps=4, gamma=1.0, tau=1.0, **extra)
    assert float((out.latents - plain.latents).abs().max()) > 1e-4  # the injection changed the sample


def test_diffusers_port_preset_injects_at_every_step_from_an_adain_latent():
    pipe = tiny_pipeline("sd")
    g = torch.Generator().manual_seed(0)
    content, style = (torch.rand(1, 3, 8, 8, generator=g) * 2 - 1 for _ in range(2))
    ldm = transfer(pipe, content, style, preset="styleid", num_inference_steps=5)
    port = transfer(pipe, content, style, preset="styleid-diffusers", num_inference_steps=5, modules=LAYER)
    n_ldm = len(ldm.content_store.modules())
    assert ldm.injected_calls == 4 * n_ldm  # the first of 5 steps is skipped
    assert port.injected_calls == 5 * len(port.content_store.modules())  # every step
    assert ldm.content_inversion.convention == "B" and port.content_inversion.convention == "A"


def test_missing_sources_refused_at_attach():
    with pytest.raises(attnkit.AttachError, match="styleid needs content= and style="):
        attnkit.attach(tiny_pipeline("sd"), StyleID())
    with pytest.raises(ValueError, match="gamma"):
        StyleID(gamma=2.0)
