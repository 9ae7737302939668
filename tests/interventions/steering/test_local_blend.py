"""Prompt-to-Prompt LocalBlend: the mask and the blend by hand, the scheduler-step hook, and a tiny pipeline run whose
blend mask is rebuilt from the captured cross-attention maps."""

import copy

import pytest
import torch

import attnkit
from attnkit.interventions.steering.local_blend import SchedulerStepHook, blend_mask, grid_of, local_blend
from attnkit.interventions.steering.prompt_to_prompt import PromptToPrompt, blend_word_alphas, char_tokenizer

STEPS = 4


def test_mask_by_hand_pool_upsample_normalise_threshold_union():
    # 3x3 maps, latent 6x6: the source attends cell (0, 0), the target cell (2, 2) with twice the mass
    maps = torch.zeros(2, 9)
    maps[0, 0], maps[1, 8] = 1.0, 2.0
    mask = blend_mask(maps, (3, 3), (6, 6), threshold=0.3)
    source = torch.zeros(6, 6)
    source[:4, :4] = 1  # the 3x3 max-pool spreads (0, 0) to cells (0..1, 0..1); each cell is 2x2 latent pixels
    target = torch.zeros(6, 6)
    target[2:, 2:] = 1
    assert torch.equal(mask[0, 0], source)
    assert torch.equal(mask[1, 0], torch.maximum(source, target))  # union with the source's mask
    # threshold on the normalised map: a weak second peak at 0.25 of the max stays out, one at 0.5 gets in
    maps = torch.zeros(1, 9)
    maps[0, 0], maps[0, 8] = 4.0, 1.0
    assert blend_mask(maps, (3, 3), (3, 3), 0.3)[0, 0, 2, 2] == 0
    maps[0, 8] = 2.0
    assert blend_mask(maps, (3, 3), (3, 3), 0.3)[0, 0, 2, 2] == 1


def test_blend_keeps_the_source_and_targets_only_inside_their_mask():
    latents = torch.stack([torch.full((2, 2, 2), 1.0), torch.full((2, 2, 2), 5.0), torch.full((2, 2, 2), 9.0)])
    mask = torch.zeros(3, 1, 2, 2)
    mask[1, 0, 0, 0] = 1
    mask[2, 0, 1, :] = 1
    out = local_blend(latents, mask)
    assert torch.equal(out[0], latents[0])
    assert out[1, :, 0, 0].tolist() == [5.0, 5.0] and out[1, :, 1, 1].tolist() == [1.0, 1.0]
    assert out[2, :, 1].flatten().tolist() == [9.0] * 4 and out[2, :, 0].flatten().tolist() == [1.0] * 4
    packed = local_blend(latents.flatten(2).transpose(1, 2), mask)  # Flux-style [P, H*W, C]
    assert torch.equal(packed, out.flatten(2).transpose(1, 2))


def test_grid_of_layers():
    assert grid_of(256, (64, 64)) == (16, 16) and grid_of(64, (8, 8)) == (8, 8) and grid_of(24, (8, 12)) == (4, 6)
    assert grid_of(10, (8, 8)) is None


class _Handle:
    removed, active = False, True


class _Scheduler:
    def step(self, model_output, timestep, sample, return_dict=True):
        return (sample + model_output,)


def test_scheduler_step_hook_runs_while_active_removes_and_copies_stock():
    sched, handle = _Scheduler(), _Handle()
    hook = SchedulerStepHook(sched, lambda prev, t: prev * 10, handle)
    assert sched.step(torch.ones(1), 0, torch.ones(1))[0].item() == 20.0
    handle.active = False
    assert sched.step(torch.ones(1), 0, torch.ones(1))[0].item() == 2.0
    handle.active = True
    assert copy.deepcopy(sched).step(torch.ones(1), 0, torch.ones(1))[0].item() == 2.0  # a copy is stock
    hook.remove()
    assert "step" not in sched.__dict__ and sched.step(torch.ones(1), 0, torch.ones(1))[0].item() == 2.0


def _run(pipe, prompts, interventions, steps=STEPS):
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(len(prompts), -1, -1, -1)
    with torch.no_grad(), attnkit.attach(pipe, interventions) as handle, handle.capture(queries="all") as cap:
        latents = pipe(prompts, latents=x_t, num_inference_steps=steps, guidance_scale=5.0,
                       output_type="latent").images
    return latents, cap.records, handle.description.component("denoiser")


def test_pipeline_local_blend_mask_from_the_captured_maps(char_pipe):
    """Words "cat" (source) and "dog" (target): the mask LocalBlend used is rebuilt from the captured conditional
    cross maps (all steps, every head, the non-mid cross layers at the latent grid: 8x8 here, as no layer has the
    latent/4 grid), and the final target latents equal the source's outside it."""
    prompts = ["a cat", "a dog"]
    # the random tiny model spreads attention almost evenly (normalised maps 0.8..1): a high threshold splits it
    p2p = PromptToPrompt(edit="refine", prompts=prompts, cross_replace_steps=0.5, blend_words=[["cat"], ["dog"]],
                         blend_threshold=0.97)
    latents, records, comp = _run(char_pipe, prompts, [p2p])
    alphas = blend_word_alphas(char_tokenizer(max_len=24), prompts, [["cat"], ["dog"]], 24)  # [P, T]
    maps = torch.zeros(2, 64)
    for rec in records:
        if comp.kinds[rec.layer] == "cross" and "mid_block" not in comp.names[rec.layer] and rec.probs.shape[2] == 64:
            cond = rec.probs[2:4]  # [P, H, Q, T] after the edit
            maps += (cond * alphas[:, None, None, :]).sum(-1).sum(1)
    want = blend_mask(maps, (8, 8), (8, 8), 0.97)
    assert torch.equal(p2p.last_blend_mask, want)
    outside = want[1, 0] == 0  # [8, 8]
    assert outside.any() and (~outside).any(), "the test needs a mask with both regions"
    assert torch.equal(latents[1][:, outside], latents[0][:, outside])
    plain, _, _ = _run(char_pipe, prompts, [PromptToPrompt(edit="refine", prompts=prompts, cross_replace_steps=0.5)])
    assert (plain[1][:, outside] - plain[0][:, outside]).abs().max() > 1e-3  # without the blend they differ there


def test_blend_start_and_no_blend_after_remove(char_pipe):
    prompts = ["a cat", "a dog"]
    steps_seen = []
    p2p = PromptToPrompt(edit="refine", prompts=prompts, blend_words=["cat", "dog"], blend_start=0.5)
    original = p2p.blend_latents

    def spy(latents, step=None, num_steps=None):
        out = original(latents, step, num_steps)
        steps_seen.append((p2p._step[0], not torch.equal(out, latents)))
        return out

    p2p.blend_latents = spy
    _run(char_pipe, prompts, [p2p])
    assert [s for s, _ in steps_seen] == [0, 1, 2, 3]
    assert [blended for _, blended in steps_seen][:2] == [False, False]  # int(0.5 * 4) = 2: from step 2 on
    assert "step" not in char_pipe.scheduler.__dict__  # the scheduler is stock again after remove()


def test_blend_words_must_match_prompts():
    with pytest.raises(ValueError, match="one entry per prompt"):
        PromptToPrompt(prompts=["a cat", "a dog"], blend_words=["cat"])
    with pytest.raises(ValueError, match="does not occur"):
        blend_word_alphas(char_tokenizer(), ["a cat", "a dog"], ["cat", "bird"], 8)
