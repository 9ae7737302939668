"""Recipes: YAML files listing interventions (in stacking order) with targets, parameters and a backend.

See :mod:`attnkit.recipes.schema` for the format. Presets ship in ``attnkit/recipes/presets/*.yaml``.

Example:
    >>> from attnkit.recipes import load_recipe, list_presets
    >>> load_recipe("noop").interventions[0]["method"]
    'noop'
"""

from attnkit.recipes.loader import list_presets, load_recipe, loads_recipe, presets_dir
from attnkit.recipes.schema import Recipe, RecipeError

__all__ = ["Recipe", "RecipeError", "list_presets", "load_recipe", "loads_recipe", "presets_dir"]
