"""DesignEdit: the worked example (zeroed key → logit 0; −∞ mode), the mask preparation, the inpainting row's maps
against keys recomputed from (1 − M)·hidden through the module's own to_k (an independent check of the linear
shortcut), the other rows untouched, and object removal end to end."""

import pytest
import torch

import attnkit
from attnkit.diffusion.inject import key_mask_bias
from attnkit.diffusion.inversion import encode, relative_error
from attnkit.diffusion.store import AttentionStore
from attnkit.hooks.diffusers import DiffusersAdapter
from attnkit.interventions.editing.designedit import DesignEdit, remove, removal_mask, zero_hidden_keys
from attnkit.testing import latent_blind, tiny_pipeline

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def test_worked_example():
    q, k = torch.tensor([1.0, 1.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    s = 2 ** -0.5
    assert torch.softmax(k @ q * s, 0).tolist() == pytest.approx([0.0967, 0.0967, 0.8066], abs=1e-4)
    zeroed = zero_hidden_keys(k, torch.tensor([0.0, 0.0, 1.0])[:, None], bias=None)
    assert torch.softmax(zeroed @ q * s, 0).tolist() == pytest.approx([0.4011, 0.4011, 0.1978], abs=1e-4)
    bias = key_mask_bias(torch.tensor([[0.0, 0.0, 1.0]])).flatten()
    assert torch.softmax(k @ q * s + bias, 0).tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_removal_mask_dilates_then_resizes():
    m = torch.zeros(16, 16)
    m[8, 8] = 1
    out = removal_mask(m, (4, 4), dilate=2)  # dilated to rows/cols 6..10, nearest to 4x4 (every 4th pixel)
    assert out.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_inpainting_row_keys_equal_to_k_of_the_masked_hidden_states():
    pipe = tiny_pipeline("sd")
    mask = torch.zeros(8, 8)
    mask[2:5, 3:7] = 1.0
    attn = dict(pipe.unet.named_modules())[LAYER]
    hidden = []
    hook = attn.register_forward_pre_hook(lambda m, a, kw: hidden.append(a[0]), with_kwargs=True)
    recorder = AttentionStore(tensors=("q", "k"), modules=LAYER)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    method = DesignEdit(mask=mask, steps=None)
    with torch.no_grad(), attnkit.attach(pipe, [recorder, method]) as handle, handle.capture(queries="all") as cap:
        pipe(["", ""], latents=latents, num_inference_steps=1, guidance_scale=7.5, output_type="latent")
    hook.remove()
    (t,) = recorder.timesteps()
    q, k = recorder.get(LAYER, t, "q"), recorder.get(LAYER, t, "k")  # [u0, u1, c0, c1]
    layer = [s.layer for s in handle.sites() if s.qualname == LAYER][0]
    probs = [r.probs for r in cap.records if r.layer == layer][0]
    m = torch.nn.functional.interpolate(mask[None, None], size=(8, 8), mode="bilinear", align_corners=False)
    with torch.no_grad():
        k_hole = attn.to_k((1 - m.flatten()[:, None]) * hidden[0][3])  # the code: to_k of the masked hidden states
    k_hole = k_hole.view(64, attn.heads, -1).transpose(0, 1)  # [H, N, D]
    s = q.shape[-1] ** -0.5
    torch.testing.assert_close(probs[3], torch.softmax(q[3] @ k_hole.transpose(-1, -2) * s, -1), atol=1e-5,
                               rtol=1e-4)
    for row in range(3):
        torch.testing.assert_close(probs[row], torch.softmax(q[row] @ k[row].transpose(-1, -2) * s, -1),
                                   atol=1e-5, rtol=1e-4)


def test_remove_reconstructs_row_zero_and_edits_row_one():
    pipe = tiny_pipeline("sd")
    latent_blind(pipe)  # an output that ignores the latent: row 0 reconstructs exactly
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1.0
    out = remove(pipe, image, mask, num_inference_steps=10, attend_scale=0)
    n_self = len(DesignEdit(mask=mask).default_layers(DiffusersAdapter(pipe).description))
    x0 = encode(pipe, image)
    assert relative_error(out.latents[:1], x0) < 1e-5
    assert relative_error(out.latents[1:], x0) > 1e-3
    assert out.edited_calls == n_self * 9  # steps 1..9 of 10 (the code's 1..39 window)


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart"])
def test_remove_on_the_transformer_families(family):
    pipe = tiny_pipeline(family)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1.0
    extra = {"use_resolution_binning": False} if family == "pixart" else {}
    method = DesignEdit(key_mask="neg_inf")  # SD3/Flux/PixArt keys are normed or rotated in the real models
    out = remove(pipe, image, mask, num_inference_steps=4, attend_scale=0, method=method, guidance_scale=3.0,
                 **extra)
    assert out.edited_calls > 0 and torch.isfinite(out.images).all() and out.images.shape == (2, 3, 16, 16)
    assert float((out.latents[1] - out.latents[0]).abs().max()) > 1e-5


def test_zero_hidden_needs_linear_keys():
    with pytest.raises(attnkit.AttachError, match="use key_mask='neg_inf'"):
        attnkit.attach(tiny_pipeline("flux"), DesignEdit(mask=torch.ones(2, 2)))  # RMS-normed, rotated keys
    with attnkit.attach(tiny_pipeline("flux"), DesignEdit(mask=torch.ones(2, 2), key_mask="neg_inf")):
        pass
    with pytest.raises(attnkit.AttachError, match="designedit needs mask="):
        attnkit.attach(tiny_pipeline("sd"), DesignEdit())
