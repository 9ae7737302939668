"""What a recipe needs: model kind, spans, tuned_for; from ``Intervention.requires`` or the fallback table."""

import pytest

from attnkit.interventions import Intervention
from attnkit.recipes import load_recipe, loads_recipe
from attnkit.recipes.needs import FALLBACK_REQUIRES, intervention_requires, model_kind, recipe_needs


class Declared(Intervention):
    name = "pasta"  # the fallback table knows this name: a declaration must win over it
    requires = frozenset({"denoiser"})


class Undeclared(Intervention):
    name = "third-party-thing"  # inherits the base class's empty requires


class EmptyDefault(Intervention):
    name = "act"
    requires = frozenset()  # e.g. a base-class default: not a declaration


def test_declared_requires_win_and_fallback_fills_in():
    assert intervention_requires(Declared()) == {"denoiser"}
    assert intervention_requires(Undeclared()) == frozenset()
    assert intervention_requires(EmptyDefault()) == FALLBACK_REQUIRES["act"]


def test_span_follows_the_parameter():
    recipe = loads_recipe("name: p\nversion: 1\ninterventions:\n  - method: pasta\n    params: {span: question}\n")
    needs = recipe_needs(recipe)
    assert needs.spans == ("question",) and needs.kind == "LLM/VLM"


@pytest.mark.parametrize("requires, kind", [
    ({"denoiser"}, "diffusion"), ({"text_decoder", "vision_tower"}, "VLM"), ({"image_tokens"}, "VLM"),
    ({"text_decoder", "rope"}, "LLM/VLM"), (set(), "?"),
])
def test_model_kind(requires, kind):
    assert model_kind(frozenset(requires)) == kind


def test_unknown_methods_are_listed(monkeypatch):
    from attnkit.interventions import INTERVENTIONS

    INTERVENTIONS.register("third-party-thing", Undeclared)
    try:
        needs = recipe_needs(loads_recipe("name: t\nversion: 1\ninterventions:\n  - method: third-party-thing\n"))
    finally:
        INTERVENTIONS.unregister("third-party-thing")
    assert needs.kind == "?" and needs.unknown == ("third-party-thing",)


def test_every_builtin_has_requirements():
    from attnkit.interventions import INTERVENTIONS, load_builtin

    load_builtin()
    assert {n for n in INTERVENTIONS.names() if not intervention_requires(INTERVENTIONS.get(n))} == set()
    assert recipe_needs(load_recipe("var-llava")).tuned_for == "llava-1.5-7b"
