"""The presets of the long-context KV methods, PINE and AGLA load through the recipe loader, carry the released
defaults, and attach and generate on a tiny model (layer choices clipped where the preset's are deeper)."""

import torch

import attnkit
from attnkit.recipes import load_recipe
from attnkit.testing import tiny_causal_lm, tiny_vlm, vlm_inputs

RELEASED = {
    "razor-attention": {"sinks": 4, "capacity": 256, "compensation_weight": "none"},
    "duo-attention": {"sinks": 64, "recent": 256, "sparsity": 0.5, "prefill": "full"},
    "recycled-attention": {"budget": 0.125, "stride": 5, "similarity": 0.85, "kernel": 7},
    "tidal-decode": {"top_k": 256, "sparse_layer_start": 2, "correction_layer": 13},
    "long-heads": {"window_size": 256, "atten_length": 4096, "begin_selective_length": 4096},
    "token-select": {"n_init": 128, "n_local": 512, "top_k": 2048, "prefill_chunk": 512},
    "pine": {"reposition": True, "bidirectional": True},
    "agla": {"alpha": 1.0, "beta": 0.5, "keep": 0.8},
}


def test_presets_carry_the_released_defaults():
    for name, want in RELEASED.items():
        (iv,) = load_recipe(name).build_interventions()
        assert {k: getattr(iv, k) for k in want} == want, name


def test_text_presets_attach_and_generate():
    model = tiny_causal_lm("llama", num_hidden_layers=4)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    for name in ("razor-attention", "duo-attention", "recycled-attention", "tidal-decode", "long-heads",
                 "token-select", "pine"):
        (iv,) = load_recipe(name).build_interventions()
        if name == "tidal-decode":
            iv.correction_layer = 3
        with attnkit.attach(model, [iv]) as handle, torch.no_grad():
            if name == "pine":
                handle.set_span("pine_segments", [[(2, 5), (5, 8)]])
            out = model.generate(ids, max_new_tokens=2, do_sample=False)
        assert out.shape == (1, 14), name


def test_agla_preset_on_a_tiny_llava():
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=1)
    with attnkit.attach(model, "agla"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
