"""lm-evaluation-harness model ``attnkit``: any lm-eval task with an attnkit recipe attached (optional extra).

``AttnkitLM`` is lm-eval's ``HFLM`` plus two model arguments:

* ``pretrained=smollm2`` loads the packaged SmolLM2-135M-Instruct (``attnkit.models.load_smollm2``); any other value
  (hub name, local folder) or a ``PreTrainedModel`` instance is loaded by ``HFLM`` as usual;
* ``recipe=<preset name | recipe.yaml>`` is attached with ``attnkit.attach`` right after loading (``recipe=none`` or
  no recipe: the stock model, i.e. the baseline); ``attn_backend`` is passed to ``attach`` (lm-eval's own
  ``backend`` argument keeps its meaning: causal / seq2seq).

The recipe stays attached while the ``AttnkitLM`` object lives; ``detach()`` removes it now, and it is removed when
the object is garbage-collected. lm-eval's CLI does not discover plug-ins, so run it through this module, which
registers the model first::

    python -m attnkit.eval.lm_eval_plugin run --model attnkit \\
        --model_args pretrained=smollm2,recipe=act-llama --tasks arc_easy --limit 50

From Python, import this module (registration happens on import) and call ``lm_eval.simple_evaluate``.

Example:
    >>> import lm_eval, attnkit.eval.lm_eval_plugin  # doctest: +SKIP
    >>> res = lm_eval.simple_evaluate(model="attnkit", model_args="pretrained=smollm2,recipe=noop",
    ...                               tasks=["arc_easy"], limit=10)  # doctest: +SKIP
    >>> split_model_args("pretrained=smollm2,recipe=act-llama")
    {'pretrained': 'smollm2', 'recipe': 'act-llama'}
"""

from __future__ import annotations

import sys
import weakref

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

SMOLLM2_NAMES = {"smollm2", "smollm2-135m-instruct"}
NO_RECIPE = {None, "", "none", "baseline"}


def split_model_args(text: str) -> dict:
    """``"a=1,b=x"`` → ``{"a": "1", "b": "x"}`` (values kept as strings; for messages and tests)."""
    return dict(item.split("=", 1) for item in text.split(",") if item)


def _dtype(value):
    import torch

    if value in (None, "auto"):
        return None
    return getattr(torch, value) if isinstance(value, str) else value


def _usable(device: str) -> bool:
    """Whether torch can place tensors on ``device`` here (``"cuda"`` on a CPU-only build: no)."""
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


def resolve_recipe(recipe):
    """The validated :class:`~attnkit.recipes.Recipe` for a ``recipe=`` model argument (``None`` for none/baseline).

    Raises :class:`~attnkit.eval.errors.EvalError` with the recipe loader's message (e.g. "did you mean …") so a
    typo is reported before the model loads.

    Example:
        >>> resolve_recipe("noop").name, resolve_recipe("none")
        ('noop', None)
    """
    if recipe in NO_RECIPE:
        return None
    import attnkit
    from attnkit.eval.errors import EvalError

    try:
        return attnkit.load_recipe(recipe)
    except (attnkit.RecipeError, KeyError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise EvalError(f"attnkit model argument recipe={recipe}: {message}") from None


@register_model("attnkit")
class AttnkitLM(HFLM):
    """``HFLM`` that attaches an attnkit recipe after loading (see the module docstring)."""

    def __init__(self, pretrained="smollm2", recipe: str | None = None, attn_backend: str = "auto", **kwargs):
        self.recipe = None if recipe in NO_RECIPE else recipe
        self.recipe_obj = resolve_recipe(recipe)  # a misspelled recipe fails here, before any model loads
        self.attn_backend = attn_backend
        if isinstance(pretrained, str) and pretrained.lower() in SMOLLM2_NAMES:
            from attnkit.models import load_smollm2

            model, tok = load_smollm2(dtype=_dtype(kwargs.pop("dtype", None)))
            device = kwargs.get("device")  # lm-eval's CLI passes "cuda" by default, also on CPU-only machines
            if device and _usable(device):
                model.to(device)
            kwargs.setdefault("tokenizer", tok)
            pretrained = model
        super().__init__(pretrained=pretrained, **kwargs)
        self.handle = None
        if self.recipe_obj is not None:
            import attnkit

            self.handle = attnkit.attach(self.model, self.recipe_obj, backend=attn_backend)
            self._finalizer = weakref.finalize(self, self.handle.remove)

    def get_model_info(self) -> dict:
        """lm-eval's model info plus ``attnkit``: the recipe (name, source, YAML, sha256; ``None`` for the
        baseline), whether it is attached, the backend and attnkit's version. lm-eval writes this into the results
        JSON also when an ``AttnkitLM`` instance is passed to ``simple_evaluate`` (then ``model_args`` is empty)."""
        from attnkit.eval.provenance import recipe_info, versions

        info = super().get_model_info()
        info["attnkit"] = {"recipe": recipe_info(self.recipe_obj) if self.recipe_obj is not None else None,
                           "attached": self.handle is not None, "attn_backend": self.attn_backend,
                           "version": versions()["attnkit"]}
        return info

    def detach(self) -> None:
        """Remove the recipe now; the model is the stock model again."""
        if self.handle is not None:
            self._finalizer()
            self.handle = None


def main(argv=None) -> int:
    """``python -m attnkit.eval.lm_eval_plugin run ...``: lm-eval's CLI with the ``attnkit`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
