"""Prompt-to-Prompt: token bookkeeping on hand cases, then replace / refine / reweight / self-replace checked on the
cross- and self-attention maps captured from a tiny pipeline run with three prompts (batch 6 with CFG)."""

import pytest
import torch

import attnkit
from attnkit.interventions.steering.prompt_to_prompt import (
    blend_word_alphas,
    PromptToPrompt,
    char_tokenizer,
    cross_alpha,
    equalizer_row,
    global_alignment,
    in_self_window,
    refine_mapper,
    replace_mapper,
    word_token_spans,
)

STEPS = 4


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(max_len=24)


# ---- token bookkeeping (hand cases) -------------------------------------------------------------------------------
def test_word_spans_and_replace_mapper_stay_aligned_after_a_longer_word(tok):
    assert word_token_spans(tok, "a cat eats") == [[1], [2, 3, 4], [5, 6, 7, 8]]
    M = replace_mapper(tok, "a cat eats", "a bird eats", 24)  # "cat" 3 tokens → "bird" 4 tokens
    assert torch.equal(M[2:5, 2:6], torch.full((3, 4), 0.25))
    # "eats" is source tokens 5..8 and target tokens 6..9; the reference code maps it diagonally (M[j, j]) instead
    assert [int(M[i].argmax()) for i in range(5, 9)] == [6, 7, 8, 9]
    assert int(M[9].argmax()) == 10  # EOS → EOS
    torch.testing.assert_close(M.sum(1)[:-1], torch.ones(23))  # each source token's attention is handed on once
    assert M[-1].sum() == 0  # (the last source padding position falls off the end: the target is one token longer)
    with pytest.raises(ValueError, match="same number of words"):
        replace_mapper(tok, "a cat", "a big cat", 24)


def test_refine_alignment_inserts_and_substitutes(tok):
    assert global_alignment([0, 7, 8, 1], [0, 7, 9, 9, 8, 1]) == [(0, 0), (1, 1), (-1, 2), (-1, 3), (2, 4), (3, 5)]
    mapper, alphas = refine_mapper(tok, "a cat", "a big cat", 24)
    assert mapper[:9].tolist() == [0, 1, -1, -1, -1, 2, 3, 4, 5] and alphas[2:5].sum() == 0
    mapper, alphas = refine_mapper(tok, "a cat", "a dog", 24)  # mismatch −1 < gap 0: a substitution is delete+insert
    assert alphas[2:5].sum() == 0 and mapper[5].item() == 5


def test_equalizer_and_schedules(tok):
    eq = equalizer_row(tok, "a cat on a mat", {"cat": 5.0, "mat": 2.0}, 24)  # two words, two strengths
    assert eq[2:5].tolist() == [5.0] * 3 and eq[8:11].tolist() == [2.0] * 3 and eq.sum() == 24 - 6 + 15 + 6
    alpha = cross_alpha(tok, ["a cat"], 0.8, 50, 24)
    assert alpha[:, 0, 1].nonzero().flatten().tolist() == list(range(40))
    alpha = cross_alpha(tok, ["a lion"], {"default_": 1.0, "lion": 0.4}, 10, 24)
    assert alpha[:, 0, 1].sum() == 11 and alpha[:, 0, 2:6].sum(0).tolist() == [4.0] * 4
    assert in_self_window(0.4, 19, 50) and not in_self_window(0.4, 20, 50)


# ---- end to end on captured maps ---------------------------------------------------------------------------------
def _run(pipe, prompts, intervention=None, seed=0):
    """Run the pipeline on ``prompts`` with one shared x_T; return (images, capture records)."""
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(1, 4, 8, 8, generator=g).expand(len(prompts), -1, -1, -1)
    with torch.no_grad(), attnkit.attach(pipe, [intervention] if intervention else []) as handle, \
            handle.capture(queries="all") as cap:
        images = pipe(prompts, latents=x_t, num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent").images
    return images, cap.records, handle.description.component("denoiser").kinds


def _cond(probs, P):
    return probs[P: 2 * P]  # [P, H, Q, K]


def test_replace_injects_source_maps_for_the_chosen_steps(char_pipe, tok):
    prompts = ["a cat on grass", "a dog on grass", "a bird on grass"]
    P = len(prompts)
    p2p = PromptToPrompt(edit="replace", prompts=prompts, cross_replace_steps=0.5)  # rows int(0.5·5)=2: steps 0, 1
    images, records, kinds = _run(char_pipe, prompts, p2p)
    stock_images, stock_records, _ = _run(char_pipe, prompts)
    M = torch.stack([replace_mapper(tok, prompts[0], t, 24) for t in prompts[1:]])  # [K, T, T]
    cross = [r for r in records if kinds[r.layer] == "cross"]
    assert len(cross) == STEPS * kinds.count("cross")
    for rec in cross:
        step = rec.call - 1
        cond = _cond(rec.probs, P)  # [P, H, Q, T]
        injected = torch.einsum("hqw,kwn->khqn", cond[0], M)
        if step < 2:
            torch.testing.assert_close(cond[1:], injected, atol=1e-6, rtol=1e-5)
        else:
            assert (cond[1:] - injected).abs().max() > 1e-4
    # the source and (at the first step) the unconditional rows are never touched
    for rec, stock in zip(records, stock_records):
        torch.testing.assert_close(rec.probs[[0, P]], stock.probs[[0, P]], atol=1e-6, rtol=1e-5)
        if rec.call == 1:
            torch.testing.assert_close(rec.probs[:P], stock.probs[:P], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(images[0], stock_images[0], atol=1e-5, rtol=1e-5)
    assert (images[1:] - stock_images[1:]).abs().max() > 1e-3


def test_refine_keeps_inserted_tokens_and_maps_aligned_ones(char_pipe, tok):
    prompts = ["a cat", "a big cat"]
    images, records, kinds = _run(char_pipe, prompts, PromptToPrompt(edit="refine", prompts=prompts,
                                                                      cross_replace_steps=1.0))
    mapper, alphas = refine_mapper(tok, prompts[0], prompts[1], 24)
    aligned = alphas.bool()
    for rec in (r for r in records if kinds[r.layer] == "cross"):
        src, tgt = _cond(rec.probs, 2)  # [H, Q, T] each
        torch.testing.assert_close(tgt[..., aligned], src[..., mapper[aligned]], atol=1e-6, rtol=1e-5)
        assert tgt[..., ~aligned].sum() > 0  # "big" keeps its own attention
    assert (images[0] - images[1]).abs().max() > 1e-3


def test_reweight_scales_token_columns_without_renormalising(char_pipe, tok):
    prompts = ["a cat on grass", "a cat on grass"]
    p2p = PromptToPrompt(edit="reweight", prompts=prompts, equalizer={"cat": 3.0, "grass": 0.5},
                         cross_replace_steps=1.0)
    _, records, kinds = _run(char_pipe, prompts, p2p)
    eq = equalizer_row(tok, prompts[1], {"cat": 3.0, "grass": 0.5}, 24)
    for rec in (r for r in records if kinds[r.layer] == "cross"):
        src, tgt = _cond(rec.probs, 2)
        torch.testing.assert_close(tgt, src * eq, atol=1e-6, rtol=1e-5)
        assert (tgt.sum(-1) - 1).abs().max() > 1e-3  # not renormalised


def test_self_replace_window_copies_source_self_attention(char_pipe):
    prompts = ["a cat", "a dog"]
    p2p = PromptToPrompt(edit="replace", prompts=prompts, cross_replace_steps=0.0, self_replace_steps=0.5)
    _, records, kinds = _run(char_pipe, prompts, p2p)
    self_recs = [r for r in records if kinds[r.layer] == "self"]
    assert self_recs
    for rec in self_recs:
        src, tgt = _cond(rec.probs, 2)
        if rec.call - 1 < 2:  # int(0.5·4) = 2: steps 0 and 1
            torch.testing.assert_close(tgt, src, atol=0, rtol=0)
        elif rec.call - 1 == 3:
            assert (tgt - src).abs().max() > 1e-4


def test_default_self_replace_window_is_the_notebooks_0_4(char_pipe):
    prompts = ["a cat", "a dog"]
    p2p = PromptToPrompt(edit="replace", prompts=prompts)  # notebooks: cross 0.8, self 0.4
    assert p2p.self_replace_steps == 0.4
    _, records, kinds = _run(char_pipe, prompts, p2p)  # 4 steps: int(0.4 · 4) = 1, so step 0 only
    for rec in (r for r in records if kinds[r.layer] == "self"):
        src, tgt = _cond(rec.probs, 2)
        if rec.call == 1:
            torch.testing.assert_close(tgt, src, atol=0, rtol=0)
        else:
            assert (tgt - src).abs().max() > 1e-4


def test_preset_loads_attaches_and_takes_prompts_later(char_pipe):
    from attnkit.recipes import load_recipe

    prompts = ["a cat", "a dog"]
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    with torch.no_grad(), attnkit.attach(char_pipe, load_recipe("prompt-to-prompt")) as handle:
        handle.interventions[0].set_prompts(prompts)
        images = char_pipe(prompts, latents=x_t, num_inference_steps=2, output_type="latent").images
        assert handle.report()["calls"]["prompt-to-prompt"] > 0
    assert images.shape[0] == 2


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="edit must be"):
        PromptToPrompt(edit="swap")
    with pytest.raises(ValueError, match="equalizer"):
        PromptToPrompt(edit="reweight")
    with pytest.raises(ValueError, match="at least two"):
        PromptToPrompt(prompts=["a cat"])


# ---- joint attention (SD3 / Flux tiny denoisers) ---------------------------------------------------------------------
def _joint_run(family, p2p, tok):
    """One call of a tiny joint-attention denoiser on [uncond ×2, cond ×2] (5 text tokens, the char tokenizer's T),
    captured; returns (per joint layer: probs [B, H, N, N], text mask [N]) and the component."""
    from attnkit.testing import denoiser_inputs, tiny_denoiser

    model = tiny_denoiser(family)
    inputs = denoiser_inputs(family, batch=4)
    with torch.no_grad(), attnkit.attach(model, [p2p] if p2p else []) as handle, \
            handle.capture(queries="all") as cap:
        if p2p:
            p2p.set_prompts(["a b", "a c"], tokenizer=tok)
        model(**inputs)
    comp = handle.description.component("denoiser")
    return {r.layer: r.probs for r in cap.records if comp.kinds[r.layer] == "joint"}, model


def _text_mask(family, n_keys, n_text=5):
    text = torch.zeros(n_keys, dtype=torch.bool)
    if family == "flux":
        text[:n_text] = True  # Flux: [text, image]
    else:
        text[n_keys - n_text:] = True  # SD3: [image, text]
    return text


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_replace_and_self_replace_by_hand(family):
    """Full windows: a target's image rows take the source's image→text block through the mapper M and the source's
    image→image block (the row then sums to 1, so no rescaling). Text rows, the source and the uncond rows: stock."""
    tok = char_tokenizer(max_len=5)
    M = replace_mapper(tok, "a b", "a c", 5)
    p2p = PromptToPrompt(edit="replace", prompts=["a b", "a c"], cross_replace_steps=1.0, self_replace_steps=1.0,
                         num_steps=1)
    joint, _ = _joint_run(family, p2p, tok)
    assert joint
    for layer, probs in joint.items():
        text = _text_mask(family, probs.shape[-1])
        img = ~text
        src, tgt = probs[2], probs[3]  # cond rows: [H, N, N]
        want_text = torch.einsum("hqw,wn->hqn", src[:, img][..., text], M)
        torch.testing.assert_close(tgt[:, img][..., text], want_text, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tgt[:, img][..., img], src[:, img][..., img], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tgt[:, img].sum(-1), torch.ones_like(tgt[:, img].sum(-1)), atol=1e-5, rtol=0)
    stock, _ = _joint_run(family, None, tok)
    first = min(joint)
    torch.testing.assert_close(joint[first][:3], stock[first][:3], atol=1e-6, rtol=1e-5)  # uncond ×2 + source
    text = _text_mask(family, joint[first].shape[-1])
    torch.testing.assert_close(joint[first][3][:, text], stock[first][3][:, text], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_cross_only_rescales_the_targets_own_image_block(family):
    """Only the first joint block, no self-replace, α = 1: the image→text block is the source's mapped one and the
    target keeps the shape of its own image→image block, rescaled to fill the rest of the row."""
    tok = char_tokenizer(max_len=5)
    M = replace_mapper(tok, "a b", "a c", 5)
    stock, model = _joint_run(family, None, tok)
    first = min(stock)
    p2p = PromptToPrompt(edit="replace", prompts=["a b", "a c"], cross_replace_steps=1.0, self_replace_steps=0.0,
                         num_steps=1, layers=[first])
    joint, _ = _joint_run(family, p2p, tok)
    probs, base = joint[first], stock[first]  # the first block's inputs are stock: its pre-edit rows are `base`
    text = _text_mask(family, probs.shape[-1])
    img = ~text
    new_text = torch.einsum("hqw,wn->hqn", base[2][:, img][..., text], M)  # [H, Qi, T]
    own = base[3][:, img][..., img]  # [H, Qi, Qi] the target's own image block
    want_img = own * (1 - new_text.sum(-1, keepdim=True)) / own.sum(-1, keepdim=True)
    torch.testing.assert_close(probs[3][:, img][..., text], new_text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs[3][:, img][..., img], want_img, atol=1e-6, rtol=1e-5)
    assert (probs[3][:, img][..., img] - own).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_local_blend_on_latents(family):
    """blend_latents with a bare denoiser: the mask comes from the joint blocks' image→text maps of each prompt's
    words (4x4 token grid); SD3 latents are [P, C, 8, 8] (2x2 patches), Flux latents are packed [P, 16 tokens, C]."""
    from attnkit.interventions.steering.local_blend import blend_mask

    tok = char_tokenizer(max_len=5)
    p2p = PromptToPrompt(edit="replace", prompts=["a b", "a c"], cross_replace_steps=1.0, num_steps=1,
                         blend_words=["b", "c"], blend_threshold=0.97)
    joint, _ = _joint_run(family, p2p, tok)
    alphas = blend_word_alphas(tok, ["a b", "a c"], ["b", "c"], 5)  # [P, T]
    maps = torch.zeros(2, 16)
    for probs in joint.values():
        text = _text_mask(family, probs.shape[-1])
        maps += (probs[2:4][:, :, ~text][..., text] * alphas[:, None, None, :]).sum(-1).sum(1)
    hw = (8, 8) if family == "sd3" else (4, 4)
    want = blend_mask(maps, (4, 4), hw, 0.97)  # [P, 1, H, W]
    latents = torch.randn(2, 4, 8, 8) if family == "sd3" else torch.randn(2, 16, 16)
    out = p2p.blend_latents(latents)
    assert torch.equal(p2p.last_blend_mask, want)
    m = want[1, 0]
    assert (m == 0).any() and (m == 1).any(), "the test needs a mask with both regions"
    pick = (lambda x, keep: x[:, keep]) if family == "sd3" else (lambda x, keep: x[keep.flatten()])  # noqa: E731
    assert torch.equal(pick(out[1], m == 0), pick(latents[0], m == 0))  # outside: the source
    assert torch.allclose(pick(out[1], m == 1), pick(latents[1], m == 1), atol=1e-6)  # inside: its own
    assert torch.equal(out[0], latents[0])
