"""DiTCtrl: triangular weights and blending by hand, the 5-layer x 23-step gate of CogVideoX-2B's 30 blocks and 50
steps, shared maps by hand over the whole joint sequence, and the multi-prompt loop against diffusers' own
CogVideoXPipeline (segments without overlap and without sharing are independent videos)."""

import diffusers
import pytest
import torch

import attnkit
from attnkit.diffusion.store import AttentionStore
from attnkit.interventions.editing.ditctrl import (
    DiTCtrl,
    blend_segments,
    multi_prompt_video,
    segment_layout,
    triangular_weights,
)
from attnkit.testing import tiny_pipeline


def test_weights_and_blending_by_hand():
    w = triangular_weights(13)
    assert [round(x, 4) for x in w] == [0.0769, 0.2308, 0.3846, 0.5385, 0.6923, 0.8462, 1.0, 0.8462, 0.6923,
                                        0.5385, 0.3846, 0.2308, 0.0769]
    assert triangular_weights(4) == [0.25, 0.75, 0.75, 0.25]
    a, b = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    out = blend_segments([(a, 0), (b, 1)], [(0, 4), (2, 6)], 6)[0].tolist()
    assert out == pytest.approx([1.0, 2.0, 0.75 * 3 + 0.25 * 10, 0.25 * 4 + 0.75 * 20, 30.0, 40.0])
    segments, mixes, length = segment_layout(3, 2, 13, 9)
    assert len(segments) == 3 + 2 * 2 and length == 13 + 6 * 4 and mixes[1] == pytest.approx((0, 2 / 3, 1, 1 / 3))


def test_layer_and_step_gate_of_cogvideox_2b():
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=30, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=4).eval()
    method = DiTCtrl(num_steps=50, cfg=False)
    x, text = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 4, 32)
    with torch.no_grad(), attnkit.attach(model, method) as handle:
        for t in range(50):
            model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([t, t]))
    layers = [m["module"] for m in handle.report()["modules"]]
    assert layers == [f"transformer_blocks.{i}.attn1" for i in range(25, 30)]
    assert method.shared_calls == 5 * 23


def test_shared_maps_cover_the_whole_joint_sequence_by_hand():
    pipe = tiny_pipeline("cogvideox")
    recorder = AttentionStore(tensors=("q", "k"), kinds=("joint",), layers=[1])
    method = DiTCtrl(start_layer=1, steps=None, cfg=True)
    latents = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1, -1)
    with torch.no_grad(), attnkit.attach(pipe, [recorder, method]) as handle, handle.capture(queries="all") as cap:
        pipe(["a cat", "a dog"], latents=latents.contiguous(), num_frames=9, height=16, width=16,
             num_inference_steps=1, guidance_scale=6.0, max_sequence_length=8, output_type="latent")
    (t,) = recorder.timesteps()
    name = handle.sites()[1].qualname
    q, k = recorder.get(name, t, "q"), recorder.get(name, t, "k")  # [u_0, u_1, c_0, c_1]
    probs = [r.probs for r in cap.records if r.layer == 1][0]
    src = torch.tensor([0, 0, 2, 2])
    want = torch.softmax(q @ k[src].transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-4)
    assert probs.shape[-1] == 8 + 3 * 16  # text and video keys of the source


def test_segments_without_overlap_or_sharing_match_the_stock_pipeline():
    pipe = tiny_pipeline("cogvideox")
    generator = torch.Generator().manual_seed(0)
    out = multi_prompt_video(pipe, ["a cat", "a red dog"], segment_frames=3, overlap=0, n_trans=0,
                             num_inference_steps=3, method=DiTCtrl(start_layer=0, steps=[0, 0]),
                             generator=generator, height=16, width=16)
    start = torch.randn(1, 6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for k, prompt in enumerate(["a cat", "a red dog"]):
        with torch.no_grad():
            stock = pipe(prompt, latents=start[:, 3 * k:3 * k + 3], num_frames=9, height=16, width=16,
                         num_inference_steps=3, guidance_scale=6.0, use_dynamic_cfg=False, max_sequence_length=8,
                         output_type="latent").frames
        torch.testing.assert_close(out.latents[:, 3 * k:3 * k + 3], stock, atol=1e-5, rtol=1e-4)


def test_sharing_changes_the_target_segment_only_in_its_window():
    pipe = tiny_pipeline("cogvideox")
    run = lambda method: multi_prompt_video(pipe, ["a cat", "a dog"], segment_frames=3, overlap=1, n_trans=1,  # noqa: E731
                                            num_inference_steps=4, method=method,
                                            generator=torch.Generator().manual_seed(0))
    shared, plain = run(DiTCtrl(start_layer=1, steps=[1, 3])), run(DiTCtrl(start_layer=1, steps=[0, 0]))
    assert shared.segments == [(0, 3), (2, 5), (4, 7)] and shared.shared_calls == 2 * 2 * 1  # 2 pairs x 2 steps
    assert torch.isfinite(shared.latents).all()
    assert float((shared.latents - plain.latents).abs().max()) > 1e-5


def test_needs_joint_attention():
    with pytest.raises(attnkit.AttachError, match="joint text-image attention"):
        attnkit.attach(tiny_pipeline("sd"), DiTCtrl(start_layer=0))
