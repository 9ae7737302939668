"""attnkit: training-free attention interventions for transformers and diffusers models.

The hook contract (which hook for which edit, stacking, backends, when the attention matrix is materialised, the
conformance matrix) is one page: ``docs/hook-contract.md``.

Example:
    >>> import attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> with attnkit.attach(model, [attnkit.get_intervention("noop")()]) as handle:
    ...     _ = model(attnkit.testing.torch.tensor([[1, 2, 3]]))
    >>> handle.report()["calls"]["noop"]
    2
"""

from attnkit.api import (
    AttachError, Handle, MaterialisedAttentionWarning, attach, available_interventions, get_intervention,
)
from attnkit.interventions import INTERVENTIONS, AttentionContext, Intervention, register_intervention
from attnkit.recipes import Recipe, RecipeError, list_presets, load_recipe, loads_recipe
from attnkit.scores import HeadScores
from attnkit.targets import Target, TargetError

__all__ = [
    "AttachError", "AttentionContext", "Handle", "HeadScores", "INTERVENTIONS", "Intervention",
    "MaterialisedAttentionWarning", "Recipe", "RecipeError", "Target", "TargetError", "attach", "available_interventions", "get_intervention",
    "list_presets", "load_recipe", "loads_recipe", "register_intervention",
]
__version__ = "0.1.0"
