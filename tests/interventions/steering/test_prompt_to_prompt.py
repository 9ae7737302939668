"""Prompt-to-Prompt: token bookkeeping on hand cases, then replace / refine / reweight / self-replace checked on the
cross- and self-attention maps captured from a tiny pipeline run with three prompts (batch 6 with CFG)."""

import pytest
import torch

import attnkit
from attnkit.interventions.steering.prompt_to_prompt import (
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
