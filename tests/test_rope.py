"""attnkit.rope: shifting post-RoPE vectors equals the model's own rotation at the new positions (several families,
Gemma-3's per-layer-type frequencies, partial rotary), scores depend on relative positions only, refusals."""

import pytest
import torch

from attnkit.rope import Rotary, rotary_embedding_of, rotary_for, rotate_half
from attnkit.testing import tiny_causal_lm, tiny_vlm


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt_neox", "phi3"])
def test_shift_equals_the_models_rotation(family):
    model = tiny_causal_lm(family)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    emb = rotary_embedding_of(model)
    layer = 1
    kwargs = {"layer_type": config.layer_types[layer]} if family.startswith("gemma3") else {}
    x = torch.randn(1, 2, 5, head_dim)
    pos = torch.arange(5)[None]

    def apply(p):
        cos, sin = emb(x, p, **kwargs)
        r = cos.shape[-1]
        xr = x[..., :r]
        return torch.cat([xr * cos[:, None] + rotate_half(xr) * sin[:, None], x[..., r:]], -1)

    rot = rotary_for(model, layer)
    moved = rot.shift(apply(pos), torch.full((5,), 9.0))
    assert torch.allclose(moved, apply(pos + 9), atol=1e-5)
    assert torch.allclose(rot.unrotate(apply(pos), pos[0].float()), x, atol=1e-5)


def test_relative_scores_and_refusals():
    rot = Rotary(1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    a = (rot.shift(q, torch.tensor([3.0] * 4)) * rot.shift(k, torch.tensor([1.0] * 4))).sum(-1)
    b = (rot.shift(q, torch.tensor([10.0] * 4)) * rot.shift(k, torch.tensor([8.0] * 4))).sum(-1)
    assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="mrope"):
        rotary_for(tiny_vlm("qwen2_vl"), 0)
    with pytest.raises(ValueError, match="rotary"):
        rotary_for(tiny_causal_lm("gpt2"), 0)
