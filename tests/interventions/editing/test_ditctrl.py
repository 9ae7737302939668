"""DiTCtrl: triangular weights and blending by hand, the 5-layer x 23-step gate of CogVideoX-2B's 30 blocks and 50
steps, shared maps by hand over the whole joint sequence, and the multi-prompt loop against diffusers' own
CogVideoXPipeline (segments without overlap and without sharing are independent videos). The mask-guided variant
(masks="auto"): mask building and the fg/bg blend by hand, one layer against a literal computation from its q/k/v,
and the multi-prompt loop end to end."""

import diffusers
import pytest
import torch

import attnkit
from attnkit.diffusion.store import AttentionStore
from attnkit.interventions.editing.ditctrl import (
    DiTCtrl,
    blend_segments,
    mask_guided_bias,
    multi_prompt_video,
    segment_layout,
    triangular_weights,
    video_text_mask,
    video_text_maps,
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


# ---- the mask-guided variant (masks="auto", KVSharingMaskGuidedAdaLNMixin) ----------------------------------------
def test_mask_building_by_hand():
    # one row, 2 frames of 2x2 video tokens, 3 text tokens; tokens 0 and 2 are summed
    frame0 = [[0.05, 0.9, 0.05], [0.2, 0.0, 0.3], [0.1, 0.5, 0.1], [0.1, 0.1, 0.2]]  # sums 0.1, 0.5, 0.2, 0.3
    frame1 = [[0.0, 0.0, 0.0], [0.5e-6, 0.0, 0.5e-6], [0.25e-6, 0.0, 0.25e-6], [0.0, 0.0, 0.0]]  # 0, 1e-6, 5e-7, 0
    maps = torch.tensor([frame0 + frame1], dtype=torch.float64).float()  # [1, 8, 3]
    # frame 0: min-max → [0, 1, 0.25, 0.5] (÷ 0.4 + 1e-6); frame 1: ÷ (1e-6 + 1e-6) → [0, 0.5, 0.25, 0]
    assert video_text_mask(maps, [0, 2], (2, 2, 2), threshold=0.3).tolist() == [[0, 1, 0, 1, 0, 1, 0, 0]]
    assert video_text_mask(maps, [0, 2], (2, 2, 2), threshold=0.1).tolist() == [[0, 1, 1, 1, 0, 1, 1, 0]]
    # without the +1e-6 frame 1 would normalise to [0, 1, 0.5, 0] and its third token would pass 0.3
    assert video_text_mask(maps, [0, 2], (2, 2, 2), threshold=0.3, eps=0.0).tolist() == [[0, 1, 0, 1, 0, 1, 1, 0]]
    constant = torch.full((1, 4, 2), 0.25)  # a constant frame normalises to 0: empty at any threshold > 0
    assert video_text_mask(constant, [1], (1, 2, 2), threshold=0.3).tolist() == [[0, 0, 0, 0]]


def test_video_text_maps_are_chunked_exactly():
    q, k = torch.randn(2, 2, 11, 4), torch.randn(2, 1, 11, 4)  # grouped kv heads
    video = torch.tensor([False] * 3 + [True] * 8)
    full = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 2, -1)  # [B, H, N, N]
    want = full[:, :, 3:, :3].mean(1)  # head mean, video rows x text cols
    for chunk in (1, 3, None):
        torch.testing.assert_close(video_text_maps(q, k, video, video, chunk=chunk), want)


def test_fg_bg_blend_by_hand():
    # METHODS-2.md §5.2 (scale folded to 1): source keys k_s = [[1,0],[0,1]] = v_s, target query [2, 0], M_s = [1, 0]
    k_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q_t = torch.tensor([[2.0, 0.0], [2.0, 0.0]])  # two target video queries, M_t = [1, 0]
    video = torch.tensor([True, True])
    bias = mask_guided_bias(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), video, video,
                            torch.tensor([True]))
    out = torch.softmax(q_t @ k_s.T + bias[0, 0], -1) @ k_s
    assert out.tolist() == [[1.0, 0.0], [0.0, 1.0]]  # M_t = 1: fg output v_s0; M_t = 0: bg output v_s1
    plain = mask_guided_bias(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), video, video,
                             torch.tensor([False]))  # not a target row: nothing masked
    mutual = (torch.softmax(q_t @ k_s.T + plain[0, 0], -1) @ k_s)[0]
    assert mutual.tolist() == pytest.approx([0.880797, 0.119203], abs=1e-6)
    # with a text token [text; video, video] (key 0, value [5, 5]): its row and its column are never masked
    k = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    joint = torch.tensor([False, True, True])
    bias = mask_guided_bias(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), joint, joint,
                            torch.tensor([True]))
    out = torch.softmax(q @ k.T + bias[0, 0], -1) @ v
    e2 = torch.e ** 2
    assert out[0].tolist() == pytest.approx(((torch.tensor([5.0, 5.0]) + e2 * torch.tensor([1.0, 0.0])) / (2 + e2)
                                             + torch.tensor([0.0, 1.0]) / (2 + e2)).tolist())  # text row: all keys
    assert out[1].tolist() == pytest.approx([(5 + e2) / (1 + e2), 5 / (1 + e2)])  # fg: text + key 1
    assert out[2].tolist() == pytest.approx([5 / 2, 6 / 2])  # bg: text + key 2 (logits 0, 0)


def _literal_masks(qs, ks, rows, token_ids, n_text, layout, threshold):
    """DiTCtrl's masks literally: full softmax per layer, head mean, video→text block, mean over the layers, sum of
    the token columns, [F, h, w], min-max per frame with +1e-6, >= threshold."""
    maps = []
    for q, k in zip(qs, ks):
        probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5, -1)  # [B, H, N, N]
        maps.append(probs.mean(1)[:, n_text:, :n_text])  # [B, Nv, T]
    agg = torch.stack(maps).mean(0)[rows][..., token_ids].sum(-1)  # [Nv]
    agg = agg.view(layout[0], -1)
    low, high = agg.min(-1, keepdim=True).values, agg.max(-1, keepdim=True).values
    return ((agg - low) / (high - low + 1e-6) >= threshold).double().flatten()  # [Nv]


def test_mask_guided_layer_equals_a_literal_computation():
    pipe = tiny_pipeline("cogvideox")
    recorder = AttentionStore(tensors=("q", "k", "v"), kinds=("joint",), layers=[0, 1])
    method = DiTCtrl(start_layer=1, steps=None, cfg=True, masks="auto", source_token_ids=[0, 1],
                     target_token_ids=[1], mask_threshold=0.3)
    attn = pipe.transformer.transformer_blocks[1].attn1
    seen = []
    hook = attn.register_forward_hook(lambda module, args, out: seen.append([o.detach().clone() for o in out]))
    latents = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1, -1)
    try:
        with torch.no_grad(), attnkit.attach(pipe, [recorder, method]) as handle:
            pipe(["a cat runs", "a dog walks"], latents=latents.contiguous(), num_frames=9, height=16, width=16,
                 num_inference_steps=1, guidance_scale=6.0, max_sequence_length=8, output_type="latent")
            names = [handle.sites()[i].qualname for i in (0, 1)]
    finally:
        hook.remove()
    (t,) = recorder.timesteps()
    qs = [recorder.get(n, t, "q") for n in names]  # [u_src, u_tgt, c_src, c_tgt] each, post-norm and RoPE
    ks = [recorder.get(n, t, "k") for n in names]
    q, k, v = qs[1].double(), ks[1].double(), recorder.get(names[1], t, "v").double()
    n_text, layout = 8, (3, 4, 4)
    m_s = _literal_masks(qs, ks, 2, [0, 1], n_text, layout, 0.3)  # the source cond row
    m_t = _literal_masks(qs, ks, 3, [1], n_text, layout, 0.3)  # the target cond row
    assert 0 < float(m_s.mean()) < 1 and 0 < float(m_t.mean()) < 1  # both masks split the video tokens
    assert torch.equal(method.last_masks[0].flatten().double(), m_s)
    assert torch.equal(method.last_masks[1].flatten().double(), m_t)
    n = q.shape[2]
    fg = torch.zeros(n, n, dtype=torch.float64)
    bg = torch.zeros(n, n, dtype=torch.float64)
    fg[n_text:, n_text:] = torch.where(m_s.bool(), 0.0, float("-inf"))[None]  # video keys outside M_s masked
    bg[n_text:, n_text:] = torch.where(m_s.bool(), float("-inf"), 0.0)[None]  # video keys inside M_s masked
    weight = torch.cat([torch.zeros(n_text, dtype=torch.float64), m_t])  # text rows: 1 on cur_token_idx
    weight[1] = 1.0
    scale = q.shape[-1] ** -0.5
    outs = []
    for row, src in ((0, 0), (1, 0), (2, 2), (3, 2)):
        scores = q[row] @ k[src].transpose(-1, -2) * scale  # [H, N, N]
        if row == src:  # the source rows attend normally
            outs.append(torch.softmax(scores, -1) @ v[src])
            continue
        out_fg = torch.softmax(scores + fg, -1) @ v[src]
        out_bg = torch.softmax(scores + bg, -1) @ v[src]
        outs.append(weight[None, :, None] * out_fg + (1 - weight[None, :, None]) * out_bg)
    out = torch.stack(outs).float()  # [B, H, N, D]
    out = attn.to_out[0](out.transpose(1, 2).reshape(4, n, -1))
    video, text = seen[0]
    torch.testing.assert_close(text, out[:, :n_text], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(video, out[:, n_text:], atol=1e-5, rtol=1e-4)
    assert method.shared_calls == 1


def test_mask_guided_multi_prompt_video_end_to_end():
    pipe = tiny_pipeline("cogvideox")
    run = lambda method: multi_prompt_video(pipe, ["a cat runs", "a dog runs"], segment_frames=3, overlap=1,  # noqa: E731
                                            n_trans=1, num_inference_steps=4, method=method,
                                            generator=torch.Generator().manual_seed(0))
    masked = DiTCtrl(start_layer=1, steps=[1, 3], masks="auto", source_token_ids=[1], target_token_ids=[1])
    out, plain = run(masked), run(DiTCtrl(start_layer=1, steps=[1, 3]))
    assert out.shared_calls == 2 * 2 * 1 and torch.isfinite(out.latents).all()  # 2 pairs x 2 steps x 1 layer
    m_s, m_t = masked.last_masks
    assert m_s.shape == (3, 4, 4) and m_t.shape == (1, 3, 4, 4) and masked.mask_grid == (3, 4, 4)
    assert float((out.latents - plain.latents).abs().max()) > 1e-5  # the masks change the shared attention


def test_mask_guided_defaults_and_arguments():
    method = DiTCtrl(masks="auto")
    assert method.mask_threshold == 0.3 and method.source_token_ids == [0] and method.target_token_ids == [0]
    assert DiTCtrl().masks is None
    with pytest.raises(ValueError, match="ditctrl: masks must be None"):
        DiTCtrl(masks=(torch.ones(2, 2), torch.ones(2, 2)))
    with pytest.raises(ValueError, match="apply only with masks='auto'"):
        DiTCtrl(source_token_ids=[1])
    with pytest.raises(ValueError, match="ditctrl: target_token_ids"):
        DiTCtrl(masks="auto", target_token_ids=[-1])
    with pytest.raises(ValueError, match="keys='all'"):
        DiTCtrl(masks="auto", keys="image")
