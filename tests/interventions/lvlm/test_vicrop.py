"""ViCrop: the worked examples of the map and the box, the high-res tiling fix, and the whole pipeline on a tiny
LLaVA (map equal to two hand captures, the final pass sees the original and the crop)."""

import numpy as np
import pytest
import torch
from PIL import Image

import attnkit
from attnkit.interventions.lvlm.vicrop import attention_map, crop_box, relative_map, tile_grid, vicrop
from attnkit.testing import tiny_vlm

IMAGE_ID = 120


def test_worked_examples():
    rel = relative_map(torch.tensor([0.02, 0.01, 0.04, 0.03]), torch.tensor([0.04, 0.005, 0.01, 0.03]))
    assert torch.allclose(rel, torch.tensor([0.5, 2.0, 4.0, 1.0]))
    assert torch.isinf(relative_map(torch.tensor([1.0]), torch.tensor([0.0]))).all()  # no epsilon in the code
    assert torch.isfinite(relative_map(torch.tensor([1.0]), torch.tensor([0.0]), eps=1e-12)).all()
    sharp = np.array([[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 9, 0], [0, 0, 0, 0]], dtype=float)
    assert crop_box(sharp, (400, 400), 100) == (200, 200, 300, 300)
    tie = np.array([[1, 1, 1, 1], [1, 4, 4, 1], [1, 4, 4, 1], [1, 1, 1, 1]], dtype=float)
    assert crop_box(tie, (400, 400), 100) == (100, 100, 200, 200)


def test_box_edges():
    M = np.zeros((4, 4))
    M[0, 3] = 5.0
    assert crop_box(M, (400, 400), 100) == (300, 0, 400, 100)  # the centre is clamped into the image
    assert crop_box(M, (400, 400), 400) == (0, 0, 400, 400)  # the window covers the whole map at r = 1
    assert tile_grid(3000, 2000) == (2, 3) and tile_grid(500, 3000) == (3, 1)  # tall image: u >= 1


def build_inputs(images, question):
    """A fake processor for the tiny LLaVA: 32x32 pixels per image, 16 image tokens each, text ids from the chars."""
    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32) / 127.5
                                           - 1.0).permute(2, 0, 1) for im in images])
    text = [3 + ord(c) % 97 for c in question[:6]]
    ids = [1, 5] + [IMAGE_ID] * (16 * len(images)) + text
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": pixels}


def test_pipeline_on_a_tiny_llava():
    model = tiny_vlm("llava")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    out = vicrop(model, build_inputs, image, "what is it?", layer=1, side=16, max_new_tokens=2)
    # the map by hand: two captures of the last row at layer 1, head mean over the image columns
    rows = []
    for q in ("what is it?", "Write a general description of the image."):
        inputs = build_inputs([image], q)
        with attnkit.attach(model, []) as h, h.capture(layers=[1]) as cap, torch.no_grad():
            model(**inputs)
        rows.append(cap.last(1)[0, :, -1].mean(0)[inputs["input_ids"][0] == IMAGE_ID])
    assert np.allclose(out["map"], (rows[0] / rows[1]).view(4, 4).numpy(), atol=1e-6)
    left, top, right, bottom = out["box"]
    assert 0 <= left < right <= 96 and 0 <= top < bottom <= 64
    assert out["crop"].size == (right - left, bottom - top)
    assert out["original"].numel() == 2 and out["answer"].numel() == 2
    seen = []

    def count_images(module, args, kwargs):
        seen.append((args[0] if args else kwargs["pixel_values"]).shape[0])

    hook = model.model.vision_tower.register_forward_pre_hook(count_images, with_kwargs=True)
    vicrop(model, build_inputs, image, "what is it?", layer=1, side=16, max_new_tokens=1)
    hook.remove()
    assert seen == [1, 1, 1, 2]  # original answer, two map passes, then the original and the crop together
    assert attention_map(model, build_inputs, image, "x", layer=1, image_token_id=IMAGE_ID).shape == (4, 4)
    with pytest.raises(ValueError, match="image token id"):
        vicrop(torch.nn.Linear(1, 1), build_inputs, image, "q", layer=1, side=16)
