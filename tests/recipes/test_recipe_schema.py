"""Recipe format: validation with file/line/field errors, presets, round trips, HeadScores targets."""

import pytest
import torch

import attnkit
from attnkit.recipes import Recipe, RecipeError, list_presets, load_recipe, loads_recipe
from attnkit.scores import HeadScores
from attnkit.testing import tiny_causal_lm

GOOD = """\
name: demo
version: 1
description: a test
backend: eager
targets:
  late: {layers: "1-1"}
interventions:
  - method: noop
    target: late
    params:
      hooks: [edit_output]
"""


def test_good_recipe_builds_and_round_trips():
    r = loads_recipe(GOOD)
    assert (r.name, r.version, r.backend) == ("demo", 1, "eager")
    (iv,) = r.build_interventions()
    assert iv.name == "noop" and iv.target.layers == "1-1"
    again = loads_recipe(r.to_yaml())
    assert again.to_dict() == r.to_dict()
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()


@pytest.mark.parametrize(
    "bad, where, words",
    [
        (GOOD.replace("backend: eager", "backend: egaer"), ":4: backend", ["did you mean 'eager'"]),
        (GOOD.replace("      hooks:", "      hokks:"), ":11: interventions[0].params.hokks", ["did you mean 'hooks'"]),
        (GOOD.replace("hooks: [edit_output]", "hooks: 5"), ":11: interventions[0].params.hooks", ["expected list"]),
        (GOOD.replace("method: noop", "method: nope"), ":8: interventions[0].method", ["did you mean 'noop'"]),
        (GOOD.replace("target: late", "target: early"), ":9: interventions[0].target", ["unknown target"]),
        (GOOD.replace("target: late", "target: late\n    layers: [0]"), ":10: interventions[0].layers", ["not both"]),
        (GOOD.replace("description:", "descripton:"), ":3: descripton", ["did you mean 'description'"]),
        (GOOD.replace("version: 1\n", ""), "<string>", ["missing required field 'version'"]),
        (GOOD.replace("    target: late\n", "    heads: [0, x]\n"), ":9: interventions[0].heads[1]", ["head index"]),
        (GOOD.replace("    target: late\n", "    heads: {scores: nowhere, top_k: 2}\n"),
         ":9: interventions[0].heads.scores", ["no saved HeadScores"]),
        (GOOD.replace("hooks: [edit_output]", "hooks: [bogus]"), ":8: interventions[0]", ["unknown hook"]),
        (GOOD + "  - method: noop\n", ":12: interventions[1].method", ["already appears"]),
        ("name: [\n", "<string>:2", ["invalid YAML"]),
    ],
)
def test_errors_name_line_and_field(bad, where, words):
    with pytest.raises(RecipeError) as info:
        loads_recipe(bad)
    msg = str(info.value)
    assert where in msg, msg
    for w in words:
        assert w in msg, msg


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD.replace("backend: eager", "backend: 3"))
    with pytest.raises(RecipeError, match=r"r\.yaml:4: backend"):
        load_recipe(str(path))


def test_yaml_is_safe(tmp_path):
    evil = GOOD.replace("description: a test", "description: !!python/object/apply:os.system ['true']")
    with pytest.raises(RecipeError, match="invalid YAML"):
        loads_recipe(evil)


def test_unknown_preset_did_you_mean():
    with pytest.raises(KeyError, match="did you mean 'noop'"):
        load_recipe("noopp")


def test_scores_target(tmp_path):
    hs = HeadScores(torch.tensor([[0.9, 0.1, 0.0, 0.2], [0.0, 0.8, 0.7, 0.0]]), method="test")
    hs.save(tmp_path / "s")
    text = GOOD.replace("    target: late\n", "    heads: {scores: s.safetensors, top_k: 3}\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    (iv,) = load_recipe(str(path)).build_interventions()
    assert iv.target.resolve(2, 4) == {0: [0], 1: [1, 2]}
    path.write_text(GOOD.replace("    target: late\n", "    heads: {scores: s, threshold: 0.5}\n"))
    (iv,) = load_recipe(str(path)).build_interventions()
    assert iv.target.resolve(2, 4) == {0: [0], 1: [1, 2]}


def test_attach_accepts_recipe_objects_and_names():
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[1, 5, 7, 9]])
    ref = model(ids).logits
    with attnkit.attach(model, loads_recipe(GOOD)) as handle:
        assert handle.report()["modules"][0]["backend"] == "eager"
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)
    with attnkit.attach(model, "noop"):
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.build_interventions() is not None
