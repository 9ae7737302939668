"""BroadWay: the worked example (energies, β, enhanced row), the NaN fallback, the edited temporal maps of a tiny
AnimateDiff pipeline against the rule applied by hand to the recorded pre-edit maps, the step window, refusal on
joint spatio-temporal attention."""

import math

import pytest
import torch

import attnkit
from attnkit.diffusion.store import AttentionStore
from attnkit.interventions.editing.broadway import BroadWay, band_energies, energy, high_band, motion_rule
from attnkit.testing import tiny_pipeline

REF = "up_blocks.1.motion_modules.0.transformer_blocks.0.attn1"
TGT = "up_blocks.2.motion_modules.0.transformer_blocks.0.attn1"


def test_worked_example():
    A = torch.tensor([0.7, 0.1, 0.1, 0.1]).view(1, 1, 1, 4)
    ref = torch.tensor([0.1, 0.6, 0.2, 0.1]).view(1, 1, 1, 4)
    guided = A + 0.6 * (ref - A)
    assert guided.flatten().tolist() == pytest.approx([0.34, 0.40, 0.16, 0.10])
    assert float(energy(A)) == pytest.approx(0.52) and float(energy(guided)) == pytest.approx(0.3112)
    low, high = band_energies(guided, high_band(4, 1))
    assert float(low) == pytest.approx(0.25) and float(high) == pytest.approx(0.0612)
    out, stats = motion_rule(A, ref, alpha=0.6, beta=1.5, tau=1, cond=torch.tensor([True]))
    assert stats["beta"] == pytest.approx(math.sqrt(0.27 / 0.0612))
    # 0.25 + β(A' − 0.25), clipped, renormalised (see the module docstring for the spec's rounding)
    raw = (0.25 + stats["beta"] * (guided - 0.25)).clamp_min(0)
    torch.testing.assert_close(out, raw / raw.sum(), atol=1e-6, rtol=1e-6)
    assert float(energy(out)) == pytest.approx(0.45468, abs=1e-5)


def test_nan_beta_falls_back_to_the_user_beta():
    A = torch.tensor([0.25, 0.25, 0.25, 0.25]).view(1, 1, 1, 4)  # E1 = E_l: β_c = 0/0
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25]).view(1, 1, 1, 4)
    _, stats = motion_rule(A, ref, alpha=0.5, beta=1.5, tau=1, cond=torch.tensor([True]))
    assert stats["beta"] == 1.5


def test_edited_maps_equal_the_rule_applied_by_hand():
    pipe = tiny_pipeline("animatediff")
    recorder = AttentionStore(tensors=("maps",), modules="up_blocks.[12].motion_modules.0.*attn1$")
    method = BroadWay(tau=1, alpha=0.6, beta=1.5, window=1.0)
    latents = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attnkit.attach(pipe, [recorder, method]) as handle, handle.capture(queries="all") as cap:
        pipe("a cat", latents=latents, num_frames=4, height=8, width=8, num_inference_steps=1, guidance_scale=3.0,
             output_type="latent")
    (t,) = recorder.timesteps()
    a_ref, a_tgt = recorder.get(REF, t, "maps"), recorder.get(TGT, t, "maps")  # [2·h·w, H, F, F], [2·4·4, ...]
    assert a_ref.shape[0] == 2 * 4 * 4 and a_tgt.shape[0] == 2 * 8 * 8
    grid = a_ref.view(2, 4, 4, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(a_tgt.shape)
    cond = torch.arange(a_tgt.shape[0]) >= 64  # [uncond, cond]
    want, stats = motion_rule(a_tgt, resized, alpha=0.6, beta=1.5, tau=1, cond=cond)
    layer = [s.layer for s in handle.sites() if s.qualname == TGT][0]
    got = [r.probs for r in cap.records if r.layer == layer][0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert any(s["module"] == TGT and s["beta"] == pytest.approx(stats["beta"]) for s in method.stats)


def test_only_the_first_fifth_of_the_steps_and_the_output_changes():
    pipe = tiny_pipeline("animatediff")
    kwargs = dict(num_frames=4, height=8, width=8, num_inference_steps=10, guidance_scale=3.0, output_type="latent")
    latents = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = pipe("a cat", latents=latents, **kwargs).frames
        method = BroadWay()
        with attnkit.attach(pipe, method):
            edited = pipe("a cat", latents=latents, **kwargs).frames
    assert {s["step"] for s in method.stats} == {0, 1}  # ceil(0.2 · 10) = 2 steps
    assert {s["module"].split(".motion")[0] for s in method.stats} == {"up_blocks.1", "up_blocks.2"}
    assert torch.isfinite(edited).all() and float((edited - stock).abs().max()) > 1e-5


def test_joint_spatio_temporal_attention_is_refused():
    with pytest.raises(attnkit.AttachError, match="temporal attention modules"):
        attnkit.attach(tiny_pipeline("cogvideox"), BroadWay())
