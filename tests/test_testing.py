"""attnkit.testing: the helpers do what their names say (the left-padded batches really are padded per sample)."""

import pytest
import torch

from attnkit.testing import VISION_FAMILIES, padded_batch, stack_left_padded, tiny_causal_lm, tiny_vlm, vlm_inputs


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_vlm_inputs_pad_every_sample_differently(family):
    model = tiny_vlm(family)
    inputs = vlm_inputs(family, model, batch=3, left_pad=2)
    mask = inputs["attention_mask"]
    assert (mask == 0).sum(1).tolist() == [2, 1, 0]
    assert (mask.cumsum(1) > 0).eq(mask.bool()).all()  # padding is on the left only
    image = inputs["input_ids"] == model.config.image_token_id
    assert image.sum(1).unique().numel() == 1 and bool((image & ~mask.bool()).sum() == 0)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits[mask.bool()]).all()


@pytest.mark.parametrize("family", ["llama", "gpt2", "llava", "qwen2_vl"])
def test_padded_batch_rows_are_the_samples_left_padded(family):
    model = tiny_vlm(family) if family in VISION_FAMILIES else tiny_causal_lm(family)
    batch, samples = padded_batch(family, model, lengths=(5, 3, 2))
    assert batch["input_ids"].shape[0] == len(samples) + 1 and not batch["attention_mask"][-1].any()
    pads = (batch["attention_mask"][:-1] == 0).sum(1).tolist()
    assert len(set(pads)) == len(pads)  # every sample padded by a different amount
    for row, sample in enumerate(samples):
        n = sample["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, -n:], sample["input_ids"][0])
        assert batch["attention_mask"][row, :-n].sum() == 0 and batch["attention_mask"][row, -n:].all()


def test_stack_left_padded_concatenates_non_token_inputs():
    a = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
         "pixel_values": torch.zeros(1, 3)}
    b = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
         "pixel_values": torch.ones(1, 3)}
    batch = stack_left_padded([a, b])
    assert batch["input_ids"].tolist() == [[5, 6], [0, 7]] and batch["pixel_values"][:, 0].tolist() == [0.0, 1.0]
