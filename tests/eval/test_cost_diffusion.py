"""Cost measurement (KV bytes by hand) and the weight-free image statistics and CLIP score."""

import numpy as np
import pytest
import torch

from attnkit.eval.metrics import diffusion
from attnkit.eval.metrics.cost import kv_cache_bytes, measure_cost


def test_cost_kv_bytes_and_consistency(tiny_llama):
    c = measure_cost(tiny_llama, torch.arange(12)[None], new_tokens=4)
    # 2 (K, V) x 2 layers x batch 1 x 2 KV heads x (12 + 4 - 1) tokens x head_dim 8 x 4 bytes
    assert c["kv_cache_bytes"] == 2 * 2 * 1 * 2 * 15 * 8 * 4
    assert c["tokens_per_s"] * c["decode_s_per_token"] == pytest.approx(1.0)
    assert c["prefill_s"] > 0 and c["peak_memory_bytes"] > 0 and c["peak_memory_source"] == "cpu_peak_rss"
    assert measure_cost(tiny_llama, torch.arange(5)[None], new_tokens=1)["decode_s_per_token"] == 0.0
    assert kv_cache_bytes(None) == 0
    with pytest.raises(ValueError, match="new_tokens"):
        measure_cost(tiny_llama, torch.arange(5)[None], new_tokens=0)


def test_colourfulness_hand():
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    assert diffusion.colourfulness(red) == pytest.approx(0.3 * np.hypot(255, 127.5))
    grey = np.full((3, 3, 3), 77, np.uint8)
    assert diffusion.colourfulness(grey) == 0.0
    half = np.zeros((1, 2, 3), np.uint8)
    half[0, 0] = (255, 0, 0)  # rg = [255, 0], yb = [127.5, 0]
    expected = np.hypot(127.5, 63.75) + 0.3 * np.hypot(127.5, 63.75)
    assert diffusion.colourfulness(half) == pytest.approx(expected)


def test_sharpness_hand():
    img = np.zeros((4, 4, 3), np.uint8)
    img[1, 1] = 255
    # interior Laplacian values: -1020, 255, 255, 0 -> variance 276356.25
    assert diffusion.sharpness(img) == pytest.approx(276356.25, rel=1e-6)
    assert diffusion.sharpness(np.full((5, 5, 3), 9, np.uint8)) == 0.0
    as_tensor = torch.from_numpy(img).permute(2, 0, 1).float() / 255  # [3, H, W] in 0..1
    assert diffusion.sharpness(as_tensor) == pytest.approx(276356.25, rel=1e-6)
    with pytest.raises(ValueError, match="3x3"):
        diffusion.sharpness(np.zeros((2, 2, 3)))


def test_clip_score_tiny_random_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8), projection_dim=8)
    model = CLIPModel(cfg).eval()
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: i + 2 for i, c in enumerate(chars)},
             **{c + "</w>": i + 28 for i, c in enumerate(chars[:10])}}
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                            crop_size={"height": 16, "width": 16}), tokenizer=tok)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (20, 24, 3), dtype=np.uint8) for _ in range(3)]
    texts = ["a cat", "dog", "big red bus"]
    got = diffusion.clip_score(model, proc, images, texts)
    inputs = proc(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    expected = (100 * (img * txt).sum(-1)).clamp(min=0).tolist()
    assert got == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="one text per image"):
        diffusion.clip_score(model, proc, images, texts[:2])
