"""FateZero: the blend-mask worked example, the fused maps against the rule applied by hand to the stored inversion
maps and the edit's own maps (P2P refine on cross-attention with its α window, self-attention replaced or kept by
the blend mask, unconditional rows untouched), and a video edit on the tiny AnimateDiff pipeline."""

import pytest
import torch

import attnkit
from attnkit.diffusion.inversion import ddim_invert, encode
from attnkit.diffusion.store import AttentionStore
from attnkit.interventions.editing.fatezero import FateZero, blend_mask, edit_video
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
