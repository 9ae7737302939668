"""MasaCtrl: the worked example (plain and two-region variants), injected maps against a hand computation from the
recorded q/k (targets read the source's keys, the source keeps its own), union mode, real-image editing whose source
row reconstructs the input, and end-to-end runs on image and video pipelines."""

import pytest
import torch

import attnkit
from attnkit.diffusion.inject import region_bias, replace_kv
from attnkit.diffusion.inversion import encode, relative_error
from attnkit.diffusion.store import AttentionStore
from attnkit.interventions.editing.masactrl import MasaCtrl, cross_attention_mask, edit_real
from attnkit.testing import latent_blind, tiny_pipeline

LAYER = "up_blocks.1.attentions.1.transformer_blocks.0.attn1"


def test_worked_example():
    k_s = v_s = torch.eye(2).view(1, 1, 2, 2)
    k = torch.cat([k_s, torch.full_like(k_s, 5.0)])  # [source, target]
    k2, v2 = replace_kv(k, k, k_s, v_s, rows=torch.tensor([False, True]))
    q_t = torch.tensor([2.0, 0.0]).view(1, 1, 1, 2)
    out = torch.softmax(q_t @ k2[1:].transpose(-1, -2), -1) @ v2[1:]
    assert out.flatten().tolist() == pytest.approx([0.880797, 0.119203], abs=1e-6)
    # mask variant, M_s = [1, 0]: a target query in the foreground reads v_s0, one in the background v_s1
    bias = region_bias(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))  # queries: [fg, bg]
    q = torch.tensor([[2.0, 0.0], [2.0, 0.0]]).view(1, 1, 2, 2)
    out = torch.softmax(q @ k_s.transpose(-1, -2) + bias, -1) @ v_s
    assert out[0, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def _maps(pipe, method, prompts=("a cat", "a red cat"), steps=3):
    recorder = AttentionStore(tensors=("q", "k"), modules=LAYER)
    with torch.no_grad(), attnkit.attach(pipe, [recorder, method]) as handle, \
            handle.capture(queries="all") as cap:
        pipe(list(prompts), latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(
            len(prompts), -1, -1, -1), num_inference_steps=steps, output_type="latent")
    layer = [s.layer for s in handle.sites() if s.qualname == LAYER][0]
    return recorder, [r.probs for r in cap.records if r.layer == layer]


def test_targets_read_the_source_keys_by_hand():
    pipe = tiny_pipeline("sd")
    recorder, maps = _maps(pipe, MasaCtrl(start_step=1, start_layer=3))  # steps 1, 2 of 3
    t_first, *later = sorted(recorder.timesteps(), reverse=True)
    for probs, t in zip(maps, [t_first] + later):
        q, k = recorder.get(LAYER, t, "q"), recorder.get(LAYER, t, "k")  # [4, H, N, D]: [u_s, u_t, c_s, c_t]
        src = torch.tensor([0, 0, 2, 2]) if t != t_first else torch.arange(4)  # step 0: not yet active
        want = torch.softmax(q @ k[src].transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-4)


def test_union_mode_appends_the_source_keys_for_targets_only():
    pipe = tiny_pipeline("sd")
    recorder, maps = _maps(pipe, MasaCtrl(start_step=0, start_layer=3, mode="union"), steps=2)
    t = recorder.timesteps()[-1]
    q, k = recorder.get(LAYER, t, "q"), recorder.get(LAYER, t, "k")
    probs = maps[0]  # [4, H, N, 2N]
    n = k.shape[2]
    assert probs.shape[-1] == 2 * n
    assert float(probs[[0, 2], :, :, n:].abs().max()) == 0.0  # sources: appended keys masked
    keys = torch.cat([k[1], k[0]], 1)  # target 1: [own; source]
    want = torch.softmax(q[1] @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    torch.testing.assert_close(probs[1], want, atol=1e-5, rtol=1e-4)


def test_mask_variant_keeps_foreground_and_background_apart():
    pipe = tiny_pipeline("sd")
    m = torch.zeros(8, 8)
    m[:4] = 1.0  # top half foreground, in both images
    recorder, maps = _maps(pipe, MasaCtrl(start_step=0, start_layer=3, masks=(m, m)), steps=1)
    probs = maps[0]  # layer grid 8x8: token i is in the fg iff i < 32
    fg = torch.arange(64) < 32
    target = probs[3]  # cond target
    assert float(target[:, fg][:, :, ~fg].abs().max()) == 0.0 and float(target[:, ~fg][:, :, fg].abs().max()) == 0.0
    assert float(probs[2, :, fg][:, :, ~fg].sum()) > 0  # the source row is not masked


def test_real_image_edit_reconstructs_the_source_row():
    pipe = tiny_pipeline("sd")
    latent_blind(pipe)  # an output that ignores the latent: the reconstruction is exact
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    out = edit_real(pipe, image, "a red cat", num_inference_steps=6,
                    method=MasaCtrl(start_step=0, start_layer=3))
    x0 = encode(pipe, image)
    assert relative_error(out.latents[:1], x0) < 1e-5
    assert relative_error(out.latents[1:], x0) > 1e-3 and out.edited_calls > 0 and out.images.shape[0] == 2


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart", "animatediff", "cogvideox"])
def test_runs_on_every_family_and_changes_only_the_target(family):
    pipe = tiny_pipeline(family)
    from attnkit.diffusion.inversion import call_pipeline, output_latents
    shapes = {"sd3": (1, 4, 16, 16), "flux": (1, 64, 16), "pixart": (1, 4, 16, 16), "animatediff": (1, 4, 4, 8, 8),
              "cogvideox": (1, 3, 4, 8, 8)}
    latents = torch.randn(*shapes[family], generator=torch.Generator().manual_seed(0))
    latents = latents.expand(2, *latents.shape[1:]).contiguous()
    extra = {"use_resolution_binning": False} if family == "pixart" else {}
    run = lambda: output_latents(call_pipeline(pipe, latents, ["a cat", "a red cat"], 2, 3.0, extra))  # noqa: E731
    with torch.no_grad():
        stock = run()
        method = MasaCtrl(start_step=0, start_layer=1)
        with attnkit.attach(pipe, method):
            edited = run()
    assert method.edited_calls > 0
    torch.testing.assert_close(edited[0], stock[0], atol=1e-5, rtol=1e-4)  # the source is untouched
    assert float((edited[1] - stock[1]).abs().max()) > 1e-4


def test_errors_are_one_sentence():
    with pytest.raises(attnkit.AttachError, match="start_layer 10 is past this model's"):
        attnkit.attach(tiny_pipeline("sd"), MasaCtrl())
    with pytest.raises(ValueError, match="mode must be one of"):
        MasaCtrl(mode="mix")


# ---- masks="auto" (MutualSelfAttentionControlMaskAuto) ----------------------------------------------------------
def test_cross_attention_mask_by_hand():
    maps = torch.zeros(2, 1, 4, 3)  # [L, P, Q, T] on a 2x2 grid; token 0 (BOS) is ignored
    maps[:, :, :, 0] = 0.3
    maps[0, 0, :, 1] = torch.tensor([0.6, 0.4, 0.2, 0.1])
    maps[1, 0, :, 1] = torch.tensor([0.4, 0.4, 0.2, 0.1])  # layer mean: [0.5, 0.4, 0.2, 0.1]
    maps[:, 0, :, 2] = torch.tensor([0.0, 0.2, 0.02, 0.1])  # token sum: [0.5, 0.6, 0.22, 0.2]
    # min-max: (x - 0.2) / 0.4 = [0.75, 1.0, 0.05, 0.0]; >= 0.1 -> [1, 1, 0, 0]
    assert cross_attention_mask(maps, [1, 2], (2, 2)).tolist() == [[[1.0, 1.0], [0.0, 0.0]]]
    assert cross_attention_mask(maps, [1, 2], (2, 2), threshold=0.01).tolist() == [[[1.0, 1.0], [1.0, 0.0]]]
    assert cross_attention_mask(maps, [0], (2, 2)).tolist() == [[[0.0, 0.0], [0.0, 0.0]]]  # constant map: empty


def _run(pipe, method, steps=1, prompts=("a cat", "a red cat")):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(len(prompts), -1, -1, -1)
    with torch.no_grad(), attnkit.attach(pipe, method):
        return pipe(list(prompts), latents=latents, num_inference_steps=steps, output_type="latent").images


AUTO = dict(start_step=0, start_layer=3, masks="auto", source_token_ids=[2], target_token_ids=[3])


def test_auto_masks_follow_the_cross_attention_maps_by_hand():
    """The masks at block 3 (up_blocks.1.attentions.1) from the conditional cross-attention of the 8x8 layers that
    ran before it in the same call (down_blocks.0, up_blocks.1.attentions.0), recomputed from captured maps."""
    pipe = tiny_pipeline("sd")
    method = MasaCtrl(**AUTO, mask_resolution=8)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    with torch.no_grad(), attnkit.attach(pipe, method) as handle, handle.capture(queries="all") as cap:
        pipe(["a cat", "a red cat"], latents=latents, num_inference_steps=1, output_type="latent")
    names = {s.layer: s.qualname for s in handle.sites()}
    before = ("down_blocks.0.attentions.0.transformer_blocks.0.attn2",
              "up_blocks.1.attentions.0.transformer_blocks.0.attn2")
    maps = torch.stack([r.probs[2:].mean(1) for r in cap.records if names[r.layer] in before])  # [2, P, 64, T]
    assert maps.shape[0] == 2 and method.mask_grid == (8, 8)
    want_s = cross_attention_mask(maps[:, :1], [2], (8, 8))[0]
    want_t = cross_attention_mask(maps[:, 1:], [3], (8, 8))
    m_s, m_t = method.last_masks
    assert torch.equal(m_s, want_s) and torch.equal(m_t, want_t)
    assert 0 < float(m_s.sum()) < 64 and 0 < float(m_t.sum()) < 64  # both regions are non-empty


def test_auto_masks_equal_the_explicit_mask_variant():
    pipe = tiny_pipeline("sd")
    auto = MasaCtrl(**AUTO, mask_resolution=8)
    out_auto = _run(pipe, auto)
    m_s, m_t = auto.last_masks
    out_explicit = _run(pipe, MasaCtrl(start_step=0, start_layer=3, masks=(m_s, m_t[0])))
    out_plain = _run(pipe, MasaCtrl(start_step=0, start_layer=3))
    torch.testing.assert_close(out_auto, out_explicit, atol=0, rtol=0)
    assert float((out_auto[1] - out_plain[1]).abs().max()) > 1e-6  # the masks matter
    torch.testing.assert_close(out_auto[0], out_plain[0], atol=1e-6, rtol=1e-5)  # the source is untouched


def test_auto_mask_resolution_rule():
    pipe = tiny_pipeline("sd")  # cross-attention grids: 8x8 (down 0, up 1) and 4x4 (mid) on an 8x8 latent
    default = MasaCtrl(**AUTO)  # latent/4 = 2x2: nothing that coarse, so the coarsest (the 4x4 mid block)
    _run(pipe, default, steps=2)
    assert default.mask_grid == (4, 4) and default.last_masks[0].shape == (4, 4)
    finer = MasaCtrl(**AUTO, mask_resolution=6)  # 36 queries: the largest not above is 4x4 = 16
    _run(pipe, finer, steps=2)
    assert finer.mask_grid == (4, 4)
    first = MasaCtrl(start_step=0, start_layer=0, end_layer=1, masks="auto", mask_resolution=8)  # before any cross
    _run(pipe, first)
    assert first.last_masks is None and first.edited_calls > 0  # plain mutual self-attention there


def test_auto_mask_errors_are_one_sentence():
    with pytest.raises(ValueError, match="masks must be None, 'auto' or a pair"):
        MasaCtrl(masks="automatic")
    with pytest.raises(ValueError, match="apply only with masks='auto'"):
        MasaCtrl(source_token_ids=[1])
    with pytest.raises(ValueError, match="target_token_ids must be a token position"):
        MasaCtrl(masks="auto", target_token_ids=[])
    with pytest.raises(ValueError, match="mask_threshold must be a number in"):
        MasaCtrl(masks="auto", mask_threshold=2)
    with pytest.raises(ValueError, match="mask_resolution must be None or a positive int"):
        MasaCtrl(masks="auto", mask_resolution=0)
    with pytest.raises(ValueError, match="source_token_ids \\[9\\] index past the 8 text tokens"):
        _run(tiny_pipeline("sd"), MasaCtrl(start_step=0, start_layer=3, masks="auto", source_token_ids=[9]))
    with pytest.raises(attnkit.AttachError, match="has no cross-attention layer"):
        attnkit.attach(tiny_pipeline("sd3"), MasaCtrl(start_layer=1, masks="auto"))
