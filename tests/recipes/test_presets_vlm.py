"""Every preset of this family loads through the recipe loader and attaches/runs on a tiny model it targets."""

import pytest
import torch

import attnkit
from attnkit.recipes import load_recipe
from attnkit.testing import tiny_causal_lm, tiny_vlm, vlm_inputs

VLM_PRESETS = ["fastv", "visual-exit", "vtc-cls", "vhr", "paint", "cmai"]
LLM_PRESETS = ["pasta", "kv-retention"]


@pytest.mark.parametrize("name", VLM_PRESETS)
def test_vlm_preset_loads_and_runs(name):
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=2, left_pad=1)
    recipe = load_recipe(name)
    with torch.no_grad(), attnkit.attach(model, _fit(recipe)) as handle:
        out = model(**inputs).logits
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.isfinite(out).all() and handle.report()["recipe"]


@pytest.mark.parametrize("name", LLM_PRESETS)
def test_llm_preset_loads_and_runs(name):
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[0, 1, 5, 7, 9, 11], [1, 4, 6, 8, 10, 12]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad(), attnkit.attach(model, load_recipe(name)) as handle:
        handle.set_span("emphasis", [[(2, 4)], [(1, 3)]])
        out = model(input_ids=ids, attention_mask=mask).logits
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.isfinite(out[mask.bool()]).all()


def _fit(recipe):
    """Interventions of a preset, with layer choices clipped to the tiny 2-layer model where the preset's are deeper."""
    ivs = list(recipe.build_interventions())
    for iv in ivs:
        if iv.name in ("fastv", "visual-exit"):
            iv.k = 1
    return ivs
