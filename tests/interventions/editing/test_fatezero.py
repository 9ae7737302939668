"""FateZero: the blend-mask worked example, the fused maps against the rule applied by hand to the stored inversion
maps and the edit's own maps (P2P refine on cross-attention with its α window, self-attention replaced or kept by
the blend mask, unconditional rows untouched), and a video edit on the tiny AnimateDiff pipeline; sparse-causal
self-attention (key-frame selection by hand, one layer against a literal softmax over the gathered keys, video edits
on SD frames and AnimateDiff with the key frames recorded); latent blending (mask union by hand, the two extreme
thresholds end to end)."""

import warnings

import pytest
import torch

import attnkit
from attnkit.diffusion.inversion import ddim_invert, encode
from attnkit.diffusion.store import AttentionStore
from attnkit.interventions.editing.fatezero import (
    FateZero,
    SparseCausalAttention,
    blend_mask,
    check_index,
    edit_video,
    key_frames,
    sparse_causal_kv,
)
from attnkit.interventions.steering.prompt_to_prompt import cross_alpha, refine_mapper
from attnkit.testing import tiny_pipeline

SELF = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
CROSS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def test_blend_mask_worked_example():
    m = torch.zeros(1, 4, 4)
    m[0, 1, 1], m[0, 3, 3] = 0.1, 0.4
    pooled = torch.nn.functional.max_pool2d(m[:, None], 3, stride=1, padding=1)[0, 0]
    # the spec's "top-left 3x3 block 0.1" overlaps the 0.4 block at (2, 2), which max-pooling gives 0.4
    assert pooled[2:, 2:].eq(0.4).all() and pooled[:2, :3].eq(0.1).all() and pooled[2, :2].eq(0.1).all()
    assert pooled[0, 3] == 0 and pooled[3, 0] == 0
    want = torch.zeros(4, 4)
    want[2:, 2:] = 1
    assert torch.equal(blend_mask(m, (4, 4), 0.3).view(4, 4), want)
    assert blend_mask(m, (4, 4), 2.0).sum() == 0  # blend_th [2, 2]: copy every self-attention row


def _edit(pipe, method, steps=4):
    source, target = "a cat", "a red cat"
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    store = AttentionStore(tensors=("maps",), kinds=("self", "cross"), max_queries=64)
    inv = ddim_invert(pipe, encode(pipe, image), prompt=source, num_inference_steps=steps, record=store)
    method.set_source(store)
    current = AttentionStore(tensors=("maps",), kinds=("self", "cross"), modules="down_blocks.0")  # pre-fusion
    with torch.no_grad(), attnkit.attach(pipe, [current, method]) as handle, handle.capture(queries="all") as cap:
        pipe(target, latents=inv.final, num_inference_steps=steps, guidance_scale=7.5, output_type="latent")
    layers = {s.qualname: s.layer for s in handle.sites()}
    fused = {name: [r.probs for r in cap.records if r.layer == layers[name]] for name in (SELF, CROSS)}
    return store, current, fused


def test_fused_maps_by_hand():
    pipe = tiny_pipeline("sd")
    method = FateZero(prompts=["a cat", "a red cat"], cross_replace_steps=0.5, self_replace_steps=[0.0, 0.5],
                      max_queries=64)
    store, current, fused = _edit(pipe, method)
    tok, T = pipe.tokenizer, pipe.tokenizer.model_max_length
    mapper, a_tok = refine_mapper(tok, "a cat", "a red cat", T)
    alpha = cross_alpha(tok, ["a red cat"], 0.5, 4, T)[:, 0]  # [N+1, T]: rows 0..1 active
    for step, t in enumerate(sorted(store.timesteps(), reverse=True)):
        inv_c, now_c = store.get(CROSS, t, "maps"), current.get(CROSS, t, "maps")  # [1, H, Q, T], [2, H, Q, T]
        edited = inv_c[..., mapper.clamp_min(0)] * a_tok + now_c[1:] * (1 - a_tok)
        want = edited * alpha[step] + now_c[1:] * (1 - alpha[step])
        torch.testing.assert_close(fused[CROSS][step][1:], want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fused[CROSS][step][:1], now_c[:1], atol=1e-6, rtol=1e-5)  # uncond untouched
        inv_s, now_s = store.get(SELF, t, "maps"), current.get(SELF, t, "maps")
        want_self = inv_s if step < 2 else now_s[1:]  # window int(0·4) ≤ step < int(0.5·4)
        torch.testing.assert_close(fused[SELF][step][1:], want_self, atol=1e-5, rtol=1e-4)
    assert method.fused_calls > 0


def _word_map(store, t):
    """"cat" (token 2 of "a cat") averaged over heads and the stored 8x8 cross layers (blend_queries=64)."""
    cross = [m for m in store.modules() if m.endswith("attn2") and store.get(m, t, "maps").shape[2] == 64]
    assert len(cross) == 3  # down_blocks.0 and up_blocks.1 (x2); the 4x4 mid block is left out
    maps = [store.get(m, t, "maps")[..., [2]].sum(-1).mean(1) for m in cross]  # [1, Q] each
    return torch.stack(maps).mean(0).view(1, 8, 8)


def test_blend_words_keep_the_edit_inside_the_mask():
    pipe = tiny_pipeline("sd")
    probe = FateZero(prompts=["a cat", "a red cat"], max_queries=64)
    store, _, _ = _edit(pipe, probe, steps=2)  # deterministic: the same store as the run below
    t = store.timesteps()[-1]  # the first sampling step
    pooled = torch.nn.functional.max_pool2d(_word_map(store, t)[:, None], 3, stride=1, padding=1)
    th = float((pooled / pooled.max()).median())  # splits the grid
    method = FateZero(prompts=["a cat", "a red cat"], self_replace_steps=[0.0, 1.0], blend_words=["cat"],
                      blend_th=(th, th), max_queries=64, blend_queries=64)
    store, current, fused = _edit(pipe, method, steps=2)
    keep = blend_mask(_word_map(store, t), (8, 8), th)[0].bool()  # [Q]
    assert 0 < int(keep.sum()) < 64
    got, inv_s, now_s = fused[SELF][0][1], store.get(SELF, t, "maps")[0], current.get(SELF, t, "maps")[1]
    torch.testing.assert_close(got[:, keep], now_s[:, keep], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[:, ~keep], inv_s[:, ~keep], atol=1e-5, rtol=1e-4)


def test_video_edit_on_animatediff_stores_per_frame_maps():
    pipe = tiny_pipeline("animatediff")
    video = torch.rand(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = edit_video(pipe, video, "a cat", "a red cat", num_inference_steps=3, max_queries=64)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert out.store.get(name, out.inversion.timesteps[0], "maps").shape[0] == 4  # one row per frame
    assert not any("motion_modules" in m for m in out.store.modules())  # temporal modules are not fused
    assert out.fused_calls > 0 and torch.isfinite(out.frames).all() and out.frames.shape == (1, 4, 3, 8, 8)


def test_needs_a_source_and_prompts():
    with pytest.raises(attnkit.AttachError, match="fatezero needs source="):
        attnkit.attach(tiny_pipeline("sd"), FateZero(prompts=["a", "b"]))
    with pytest.raises(ValueError, match="prompts are"):
        FateZero(prompts=["a"])


# ---- sparse-causal attention -----------------------------------------------------------------------------------------
MID_SELF = "mid_block.attentions.0.transformer_blocks.0.attn1"  # the tiny SD UNet's only 64-channel self-attention


def test_key_frames_by_hand():
    assert key_frames(["mid"], 4).tolist() == [[1], [1], [1], [1]]  # (4 − 1) // 2
    assert key_frames(["mid"], 5).tolist() == [[2]] * 5
    assert key_frames(["first"], 3).tolist() == [[0], [0], [0]]
    assert key_frames([-1], 4).tolist() == [[0], [0], [1], [2]]  # frame 0's previous frame clipped to 0
    assert key_frames([1], 3).tolist() == [[1], [2], [2]]  # the last frame's next frame clipped to itself
    assert key_frames([-1, "first"], 4).tolist() == [[0, 0], [0, 0], [1, 0], [2, 0]]  # the code default
    assert key_frames([0, "mid"], 3).tolist() == [[0, 1], [1, 1], [2, 1]]  # own frame only when listed
    own = key_frames(["mid"], 4)[:, 0] == torch.arange(4)
    assert own.tolist() == [False, True, False, False]  # 'mid' reads frame 1: only frame 1 sees its own keys
    assert check_index(True) == ["mid"] and check_index("first") == ["first"]
    for bad in (["last"], [True], [], 1.5):
        with pytest.raises(ValueError, match="sparse_causal"):
            check_index(bad)


def test_sparse_causal_kv_gathers_key_frames():
    k = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 2, 3, 1)  # 2 videos x 3 frames, value = row index
    k2, v2 = sparse_causal_kv(k, k + 10, key_frames([-1, "first"], 3))
    assert k2.shape == (6, 2, 6, 1)
    # row v·3 + f holds frames [f − 1 clipped, 0] of video v, each frame's 3 keys in a block
    assert k2[:, 0, ::3, 0].tolist() == [[0, 0], [0, 0], [1, 0], [3, 3], [3, 3], [4, 3]]
    assert torch.equal(v2, k2 + 10)


def _sparse_layer_run(pipe, latents, method_cls_kwargs, prompt="a cat"):
    """One UNet call (1 step, no CFG) on a batch of frames with q/k/v stored (before the sparse edit), every
    self-attention's output and the fused/unfused maps captured."""
    store = AttentionStore(tensors=("q", "k", "v", "maps"), kinds=("self",))
    sc = SparseCausalAttention(**method_cls_kwargs)
    outputs = {}
    hooks = [pipe.unet.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o))
             for n in (SELF, MID_SELF)]
    try:
        with torch.no_grad(), attnkit.attach(pipe, [store, sc]):
            pipe([prompt] * latents.shape[0], latents=latents, num_inference_steps=1, guidance_scale=1.0,
                 output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    return store, sc, outputs


def test_sparse_causal_layer_equals_a_literal_computation():
    pipe = tiny_pipeline("sd")
    frames = 3
    latents = torch.randn(frames, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    store, sc, out = _sparse_layer_run(pipe, latents, {"sparse_causal": [-1, "first"], "least_sc_channel": 64})
    t = store.timesteps()[0]
    module = pipe.unet.get_submodule(MID_SELF)
    q, k, v = (store.get(MID_SELF, t, x) for x in "qkv")  # [F, H, 16, D] each, the layer's own projections
    scale = q.shape[-1] ** -0.5
    heads = []
    for f in range(frames):  # frame f reads frame max(f − 1, 0), then frame 0
        sel = [max(f - 1, 0), 0]
        k_sel = torch.cat([k[j] for j in sel], dim=1)  # [H, 2·16, D]
        v_sel = torch.cat([v[j] for j in sel], dim=1)
        p = torch.softmax(q[f] @ k_sel.transpose(-1, -2) * scale, dim=-1)  # [H, 16, 32]
        heads.append(p @ v_sel)
        torch.testing.assert_close(store.get(MID_SELF, t, "maps")[f], p, atol=1e-5, rtol=1e-4)
    merged = torch.stack(heads).permute(0, 2, 1, 3).reshape(frames, q.shape[2], -1)  # [F, 16, H·D]
    want = module.to_out[0](merged)
    torch.testing.assert_close(out[MID_SELF], want, atol=1e-5, rtol=1e-4)
    # the 32-channel layers keep per-frame self-attention
    q0, k0, v0 = (store.get(SELF, t, x) for x in "qkv")
    p0 = torch.softmax(q0 @ k0.transpose(-1, -2) * q0.shape[-1] ** -0.5, dim=-1)
    want0 = pipe.unet.get_submodule(SELF).to_out[0]((p0 @ v0).permute(0, 2, 1, 3).reshape(frames, 64, -1))
    torch.testing.assert_close(out[SELF], want0, atol=1e-5, rtol=1e-4)
    assert store.get(SELF, t, "maps").shape[-1] == 64 and sc.sparse_calls == 1  # one 64-channel call


def test_sparse_causal_video_edit_on_sd_records_key_frames():
    pipe = tiny_pipeline("sd")
    video = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # 3 frames as a batch
    out = edit_video(pipe, video, "a cat", "a red cat", num_inference_steps=3, max_queries=64,
                     sparse_causal=["mid"], least_sc_channel=64)
    t = out.inversion.timesteps[0]
    assert out.store.get(MID_SELF, t, "key_frames").tolist() == [[1], [1], [1]]
    assert out.store.get(MID_SELF, t, "maps").shape == (3, 8, 16, 16)  # one key frame: 16 keys
    assert "key_frames" not in out.store.data[(SELF, t)]  # 32 channels: per-frame
    assert out.sparse_calls == 3 and out.fused_calls > 0 and torch.isfinite(out.latents).all()
    assert out.latents.shape == (3, 4, 8, 8)


def test_sparse_causal_video_edit_on_animatediff():
    pipe = tiny_pipeline("animatediff")
    video = torch.rand(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no key-frame or shape mismatch between the two passes
        out = edit_video(pipe, video, "a cat", "a red cat", num_inference_steps=3, max_queries=64,
                         sparse_causal=[-1, "first"], least_sc_channel=32)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    t = out.inversion.timesteps[0]
    assert out.store.get(name, t, "key_frames").tolist() == [[0, 0], [0, 0], [1, 0], [2, 0]]
    assert out.store.get(name, t, "maps").shape[-1] == 2 * 64  # two key frames of 8x8 tokens
    assert out.sparse_calls > 0 and out.fused_calls > 0 and torch.isfinite(out.frames).all()


def test_sparse_causal_edit_refuses_maps_of_other_key_frames():
    pipe = tiny_pipeline("sd")
    video = torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # latents of 3 frames
    store = AttentionStore(tensors=("maps",), kinds=("self", "cross"), max_queries=64)
    inv = ddim_invert(pipe, video, prompt="a cat", num_inference_steps=2, record=store)  # per-frame inversion
    method = FateZero(source=store, prompts=["a cat", "a red cat"], sparse_causal=["mid"], least_sc_channel=64,
                      max_queries=64)
    assert "edit_kv" in method.capabilities() and "edit_kv" not in FateZero(prompts=["a", "b"]).capabilities()
    with pytest.warns(RuntimeWarning, match="other key frames"), torch.no_grad(), attnkit.attach(pipe, method):
        pipe(["a red cat"] * 3, latents=inv.final, num_inference_steps=2, output_type="latent")
    assert method.sparse_calls > 0


# ---- latent blending ------------------------------------------------------------------------------------------------
def test_blend_latent_union_of_masks_by_hand():
    pipe = tiny_pipeline("sd")
    store = AttentionStore(tensors=("maps",), kinds=("cross",))
    method = FateZero(source=store, prompts=["a cat", "a red cat"], blend_words=["cat"], blend_latents=True,
                      blend_th=(0.5, 0.5))
    src, tgt = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)
    src[:, 0, 0], tgt[:, 3, 3] = 1.0, 1.0  # after 3x3 max-pooling: the top-left / bottom-right 2x2 corners
    method._blend_maps = lambda t, device: src
    method._target_blend_maps = lambda t, device: tgt
    union = torch.zeros(4, 4)
    union[:2, :2] = union[2:, 2:] = 1
    x, x_inv = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)  # [F, C, h, w]
    got = method.blend_latent(2, 10, 1, x, x_inv)
    torch.testing.assert_close(got, x_inv + union * (x - x_inv))
    x5, inv5 = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 2, 4, 4)  # AnimateDiff [B, C, F, h, w]
    torch.testing.assert_close(method.blend_latent(8, 10, 1, x5, inv5), inv5 + union * (x5 - inv5))
    assert torch.equal(method.blend_latent(1, 10, 1, x, x_inv), x)  # 1/10 < 0.2: outside the window
    assert torch.equal(method.blend_latent(9, 10, 1, x, x_inv), x)  # 9/10 > 0.8
    assert method.blended_steps == 2
    with pytest.raises(ValueError, match="blend_latents needs blend_words"):
        FateZero(prompts=["a", "b"], blend_latents=True)


def test_blend_latents_end_to_end():
    pipe = tiny_pipeline("animatediff")
    video = torch.rand(1, 2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kwargs = dict(num_inference_steps=3, max_queries=64, blend_words=["cat"], blend_queries=16,
                  output_type="latent")
    # empty masks (threshold 2) at every step: each step's latent is the inversion's, so the edit returns x_0
    out = edit_video(pipe, video, "a cat", "a red cat", blend_latents=True, blend_latents_steps=(0.0, 1.0),
                     blend_th=(2.0, 2.0), **kwargs)
    assert out.blended_steps == 3
    torch.testing.assert_close(out.latents, out.inversion.latents[0], atol=1e-6, rtol=1e-5)
    # full masks (threshold −1): the same as no latent blending
    full = edit_video(pipe, video, "a cat", "a red cat", blend_latents=True, blend_th=(-1.0, -1.0), **kwargs)
    plain = edit_video(pipe, video, "a cat", "a red cat", blend_th=(-1.0, -1.0), **kwargs)
    assert full.blended_steps == 2 and plain.blended_steps == 0  # steps 1, 2 of 3 are in [0.2, 0.8]·3
    torch.testing.assert_close(full.latents, plain.latents, atol=1e-6, rtol=1e-5)
