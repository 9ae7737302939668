"""The diffusion editing presets: each loads, builds its method with the official code's defaults, and names the
real models it was designed for; methods that need per-edit inputs refuse a bare attach with one sentence."""

import pytest

import attnkit
from attnkit.recipes import load_recipe
from attnkit.recipes.loader import presets_dir
from attnkit.testing import tiny_pipeline

PRESETS = {
    "styleid": ("styleid", {"gamma": 0.75, "tau": 1.5, "inversion": "B", "adain": "ldm", "skip_first_step": True,
                            "num_inference_steps": 50}),
    "styleid-diffusers": ("styleid", {"inversion": "A", "adain": "diffusers", "skip_first_step": False,
                                      "num_inference_steps": 20}),
    "masactrl": ("masactrl", {"start_step": 4, "start_layer": 10, "mode": "replace"}),
    "freecustom": ("freecustom", {"mask_weights": 3.0, "style_fidelity": 1.0, "start_layer": 10}),
    "fatezero": ("fatezero", {"edit": "refine", "blend_th": (0.3, 0.3)}),
    "broadway": ("broadway", {"tau": 7, "alpha": 0.6, "beta": 1.5, "window": 0.2}),
    "broadway-videocrafter": ("broadway", {"tau": 7, "alpha": 0.1, "beta": 10.0}),
    "ditctrl": ("ditctrl", {"start_layer": 25, "end_layer": 30, "steps": [2, 25], "keys": "all"}),
    "designedit": ("designedit", {"key_mask": "zero_hidden", "steps": [1, 40], "inpaint_row": 1}),
    "a-star": ("a-star", {"max_iter_to_alter": 25, "scale_factor": 20.0, "scale_range": (1.0, 0.5)}),
}
DESIGNED_FOR = {"styleid": "Stable Diffusion 1.4", "styleid-diffusers": "2.1-base", "masactrl": "Stable Diffusion 1.4",
                "freecustom": "Stable Diffusion 1.5", "fatezero": "Stable Diffusion 1.4", "broadway": "AnimateDiff",
                "broadway-videocrafter": "VideoCrafter2", "ditctrl": "CogVideoX-2B", "designedit": "SDXL",
                "a-star": "Stable Diffusion 1.4"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_its_method_with_the_code_defaults(name):
    method, params = PRESETS[name]
    (iv,) = load_recipe(name).build_interventions()
    assert iv.name == method
    for key, value in params.items():
        assert getattr(iv, key) == value, key
    assert DESIGNED_FOR[name] in (presets_dir() / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name, needs", [("styleid", "content= and style="), ("fatezero", "source="),
                                         ("designedit", "mask="), ("a-star", "token_indices=")])
def test_presets_needing_per_edit_inputs_refuse_a_bare_attach(name, needs):
    with pytest.raises(attnkit.AttachError, match=needs):
        attnkit.attach(tiny_pipeline("sd"), name)


def test_video_presets_attach_to_their_families():
    with attnkit.attach(tiny_pipeline("animatediff"), "broadway") as handle:
        assert all("motion_modules" in m["module"] for m in handle.report()["modules"])
    with pytest.raises(attnkit.AttachError, match="start_layer 25 is past"):
        attnkit.attach(tiny_pipeline("cogvideox"), "ditctrl")  # the tiny model has 2 blocks, CogVideoX-2B 30
