"""FreeCustom: the worked example, the target's maps over [own; reference] keys by hand (weights added to logits,
masked keys never attended, references untouched), style fidelity's blend of the unconditional branch by hand, the
per-step re-noising of the references replayed from the generator, and end-to-end runs on the image families."""

import pytest
import torch

import attnkit
from attnkit.diffusion.inject import append_kv, reference_bias
from attnkit.diffusion.inversion import encode
from attnkit.diffusion.store import AttentionStore
from attnkit.interventions.editing.freecustom import FreeCustom, generate, noise_to
from attnkit.testing import tiny_pipeline

LAYER = "up_blocks.1.attentions.1.transformer_blocks.0.attn1"


def test_worked_example():
    k, v = torch.zeros(1, 1, 2, 2), torch.eye(2).view(1, 1, 2, 2)
    k2, _, bias = append_kv(k, v, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2),
                            reference_bias(torch.tensor([[1.0, 0.0]]), 3.0), rows=torch.tensor([True]))
    probs = torch.softmax(torch.zeros(1, 1, 1, 2) @ k2.transpose(-1, -2) + bias, -1)
    assert probs.flatten().tolist() == pytest.approx([0.045278, 0.045278, 0.909443, 0.0], abs=2e-6)


def _run(pipe, method, steps=2, prompts=("a cat", "a dog")):
    recorder = AttentionStore(tensors=("q", "k", "v"), modules=LAYER)
    outputs = []
    attn = dict(pipe.unet.named_modules())[LAYER]
    hook = attn.register_forward_hook(lambda m, a, out: outputs.append(out))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attnkit.attach(pipe, [recorder, method]) as handle, handle.capture(queries="all") as cap:
        pipe(list(prompts), latents=latents, num_inference_steps=steps, output_type="latent")
    hook.remove()
    layer = [s.layer for s in handle.sites() if s.qualname == LAYER][0]
    return recorder, [r.probs for r in cap.records if r.layer == layer], outputs, attn


def test_target_maps_over_own_and_masked_reference_keys_by_hand():
    pipe = tiny_pipeline("sd")
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1.0  # the reference's left half
    recorder, maps, _, _ = _run(pipe, FreeCustom(start_layer=3, masks=[mask], mask_weights=2.0), steps=1)
    (t,) = recorder.timesteps()
    q, k = recorder.get(LAYER, t, "q"), recorder.get(LAYER, t, "k")  # [u_tgt, u_ref, c_tgt, c_ref]
    probs = maps[0]  # [4, H, 64, 128]
    ref_bias = torch.where(mask.flatten() > 0, 2.0, float("-inf"))
    keys = torch.cat([k[2], k[3]], 1)
    want = torch.softmax(q[2] @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5 + torch.cat([torch.zeros(64), ref_bias]),
                         -1)
    torch.testing.assert_close(probs[2], want, atol=1e-5, rtol=1e-4)  # cond target: MRSA
    for row in (0, 1, 3):  # style_fidelity 1: the uncond target is plain; references are plain
        own = torch.softmax(q[row] @ k[row].transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        torch.testing.assert_close(probs[row, :, :, :64], own, atol=1e-5, rtol=1e-4)
        assert float(probs[row, :, :, 64:].abs().max()) == 0.0
    assert float(probs[2, :, :, 64:].view(-1, 64, 8, 8)[..., 4:].abs().max()) == 0.0  # masked half never attended


def test_style_fidelity_blends_the_unconditional_target_by_hand():
    pipe = tiny_pipeline("sd")
    recorder, _, outputs, attn = _run(pipe, FreeCustom(start_layer=3, style_fidelity=0.25), steps=1)
    (t,) = recorder.timesteps()
    q, k, v = (recorder.get(LAYER, t, n) for n in "qkv")
    s = q.shape[-1] ** -0.5
    bias = torch.cat([torch.zeros(64), torch.full((64,), 3.0)])  # no mask: the default weight 3 on every ref key
    mrsa = torch.softmax(q[0] @ torch.cat([k[0], k[1]], 1).transpose(-1, -2) * s + bias, -1) @ torch.cat([v[0], v[1]], 1)
    plain = torch.softmax(q[0] @ k[0].transpose(-1, -2) * s, -1) @ v[0]  # [H, N, D]
    heads = 0.75 * mrsa + 0.25 * plain
    with torch.no_grad():
        want = attn.to_out[0](heads.transpose(0, 1).reshape(64, -1))  # merge heads, output projection
    torch.testing.assert_close(outputs[0][0], want, atol=1e-5, rtol=1e-4)


def test_references_are_renoised_with_fresh_noise_every_step():
    pipe = tiny_pipeline("sd")
    refs = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0].clone(), float(a[1]))),
                                               with_kwargs=True)
    generate(pipe, "a cat", refs, num_inference_steps=3, method=FreeCustom(start_layer=3), output_type="latent",
             generator=torch.Generator().manual_seed(7))
    hook.remove()
    z0 = encode(pipe, refs)
    replay = torch.Generator().manual_seed(7)
    torch.randn(z0.shape, generator=replay)  # the target's initial latent
    for sample, t in seen:  # [u_tgt, u_ref, c_tgt, c_ref]
        want = noise_to(pipe.scheduler, z0, torch.randn(z0.shape, generator=replay), int(t))
        torch.testing.assert_close(sample[1:2], want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sample[3:4], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sd3", "flux", "pixart"])
def test_generate_on_every_image_family(family):
    pipe = tiny_pipeline(family)
    size = 8 if family == "sd" else 16
    refs = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    extra = {"use_resolution_binning": False} if family == "pixart" else {}
    run = lambda method: generate(pipe, "a cat", refs, masks=[torch.ones(4, 4), torch.zeros(4, 4)],  # noqa: E731
                                  num_inference_steps=2, method=method, generator=torch.Generator().manual_seed(0),
                                  **extra)
    out = run(FreeCustom(start_layer=1))
    plain = run(FreeCustom(start_layer=1, steps=[0, 0]))
    assert out.edited_calls > 0 and torch.isfinite(out.images).all()
    assert float((out.latents - plain.latents).abs().max()) > 1e-5


def test_video_denoisers_are_refused():
    with pytest.raises(attnkit.AttachError, match="image denoisers only"):
        attnkit.attach(tiny_pipeline("animatediff"), FreeCustom(start_layer=0))
