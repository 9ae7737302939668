"""Recipe values: YAML 1.2 numbers, duplicate keys, non-finite and oversized numbers, regexes, layer strings, KV-cache
conflicts, tuned_for, and where attach-time errors point."""

import math
import re
from pathlib import Path

import pytest
import torch
import yaml

import attnkit
from attnkit.interventions import Intervention
from attnkit.recipes import RecipeError, list_presets, load_recipe, loads_recipe, presets_dir
from attnkit.recipes.loader import read_yaml
from attnkit.testing import tiny_causal_lm

HEAD = "name: demo\nversion: 1\ninterventions:\n"


def one(method: str, params: str = "{}", extra: str = "") -> str:
    return HEAD + f"  - method: {method}\n    params: {params}\n" + extra


@pytest.mark.parametrize("text, expected", [
    ("4e-1", 0.4), ("-2E-2", -0.02), ("1.5e3", 1500.0), (".5", 0.5), ("3.", 3.0), ("1_000", 1000), ("010", 10),
    ("0x1F", 31), ("0o17", 15), ("-7", -7), ("2:30", "2:30"), ("1:20:30", "1:20:30"), ("yes", True), ("off", False),
    ("2-5", "2-5"), ("1e", "1e"), ("e5", "e5"), ("0b101", "0b101"),
])
def test_numbers_follow_yaml_1_2(text, expected):
    value = read_yaml(f"v: {text}\n")[0]["v"]
    assert value == expected and type(value) is type(expected)


def test_non_finite_numbers_are_read_then_refused_in_params():
    data = read_yaml("a: .inf\nb: -.Inf\nc: .nan\n")[0]
    assert data["a"] == math.inf and data["b"] == -math.inf and math.isnan(data["c"])
    for value in (".inf", "-.inf", ".nan", "[0.1, .inf]"):
        with pytest.raises(RecipeError, match=r"<string>:5: interventions\[0\]\.params\.alpha.*finite"):
            loads_recipe(one("pasta", f"{{alpha: {value}}}"))


def test_pasta_alpha_inf_would_have_made_every_logit_nan():
    """Why non-finite values are refused: the constructor accepts them and the outputs are all NaN."""
    model = tiny_causal_lm("llama")
    pasta = attnkit.get_intervention("pasta")(alpha=math.inf, layers=[0], heads=[0])
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with attnkit.attach(model, [pasta]) as handle, torch.no_grad():
        handle.set_span("emphasis", [[(1, 3)]])
        assert torch.isnan(model(ids).logits).all()


def test_huge_integers_are_refused():
    with pytest.raises(RecipeError, match=r":5: interventions\[0\]\.params\.window: expected an integer below 2\*\*63"):
        loads_recipe(one("streaming-llm", "{window: 99999999999999999999999}"))
    with pytest.raises(RecipeError, match=r":5: interventions\[0\]\.layers: expected a layer index"):
        loads_recipe(HEAD + "  - method: noop\n    layers: 99999999999999999999\n")


def test_duplicate_keys_name_both_lines():
    with pytest.raises(RecipeError) as info:
        loads_recipe(HEAD + "  - method: noop\n    params: {}\n    params: {hooks: []}\n")
    assert "<string>:6:" in str(info.value) and "duplicate key 'params' (first given on line 5)" in str(info.value)
    with pytest.raises(RecipeError, match="duplicate key 'name'"):
        loads_recipe("name: a\n" + HEAD)


def test_merge_keys_may_override():
    data = read_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n")[0]
    assert data["other"] == {"x": 1, "y": 3}


@pytest.mark.parametrize("pattern", ["self_attn[(", "(?P<", "*"])
def test_invalid_module_regex_is_located(pattern):
    with pytest.raises(RecipeError) as info:
        loads_recipe(HEAD + f"  - method: noop\n    modules: '{pattern}'\n")
    assert str(info.value).startswith("<string>:5: interventions[0].modules: ")
    assert "not a valid regular expression" in str(info.value)


@pytest.mark.parametrize("layers", ["'2-x'", "'two'", "'1-2-3'", "[0, 'a']"])
def test_unreadable_layer_strings_are_located(layers):
    with pytest.raises(RecipeError, match=r"<string>:5: interventions\[0\]\.layers"):
        loads_recipe(HEAD + f"  - method: noop\n    layers: {layers}\n")


def test_deep_nesting_is_refused_with_a_line():
    text = HEAD + "  - method: noop\n    params: {hooks: " + "[" * 500 + "]" * 500 + "}\n"
    with pytest.raises(RecipeError, match=r"<string>:5: nested more than 32 levels"):
        loads_recipe(text)


def test_two_kv_cache_policies_conflict():
    assert Intervention.exclusive is None
    streaming, retention = attnkit.get_intervention("streaming-llm"), attnkit.get_intervention("kv-retention")
    assert streaming.exclusive == retention.exclusive == "kv-cache"
    with pytest.raises(RecipeError) as info:
        loads_recipe(HEAD + "  - method: streaming-llm\n  - method: kv-retention\n")
    assert str(info.value).startswith("<string>:5: interventions[1].method: 'kv-retention' conflicts with "
                                      "interventions[0]")


def test_constructor_errors_are_not_prefixed_twice():
    with pytest.raises(RecipeError) as info:
        loads_recipe(one("pag", "{scale: -1.0}"))
    assert "pag: scale" in str(info.value) and "pag: pag:" not in str(info.value)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("preset, method", [("pag-sd", "pag"), ("fastv", "fastv"), ("vtc-cls", "vtc-cls")])
def test_attach_errors_name_file_line_and_entry_once(preset, method):
    text = (presets_dir() / f"{preset}.yaml").read_text()
    with pytest.raises(attnkit.AttachError) as info:
        attnkit.attach(tiny_causal_lm("llama"), preset)
    msg = str(info.value)
    assert re.match(rf"preset:{preset}\.yaml:{_line_of(text, f'method: {method}')}: interventions\[0\]: {method}[: ]", msg)
    assert f"{method}: {method}" not in msg


def test_attach_error_of_a_file_recipe(tmp_path):
    path = tmp_path / "late.yaml"
    path.write_text(HEAD + "  - method: noop\n  - method: act\n    layers: '5-9'\n")
    with pytest.raises(attnkit.AttachError) as info:
        attnkit.attach(tiny_causal_lm("llama"), str(path))
    assert str(info.value).startswith(f"{path}:5: interventions[1]: act: ")


def test_tuned_for_is_typed_and_round_trips():
    text = HEAD.replace("version: 1\n", "version: 1\ntuned_for: llava-1.5-7b\n") + "  - method: noop\n"
    recipe = loads_recipe(text)
    assert recipe.tuned_for == "llava-1.5-7b"
    assert loads_recipe(recipe.to_yaml()).tuned_for == "llava-1.5-7b"
    with pytest.raises(RecipeError, match=r"<string>:3: tuned_for: expected the name of a model"):
        loads_recipe(text.replace("llava-1.5-7b", "[1, 2]"))


@pytest.mark.parametrize("name", list_presets())
def test_preset_tuned_for_matches_its_file(name):
    raw = yaml.safe_load(Path(str(presets_dir() / f"{name}.yaml")).read_text())
    assert load_recipe(name).tuned_for == raw.get("tuned_for")


def test_presets_tuned_for_their_papers_models():
    expected = {"act-llama": "llama-2-7b", "var-llava": "llava-1.5-7b", "var-qwen2-vl": "qwen2-vl-7b",
                "pag-sd": "stable-diffusion"}
    assert {name: load_recipe(name).tuned_for for name in expected} == expected
