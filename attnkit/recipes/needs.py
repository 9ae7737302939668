"""What a recipe needs from a model: LLM, VLM or diffusion; the user spans it reads; the model it was tuned for.

Each intervention says what it needs in a class (or instance) attribute ``requires``: a set of strings among

==================  =====================================================================================
``text_decoder``    attention layers of a language model (LLMs and the language half of VLMs)
``image_tokens``    image tokens in the input sequence (``config.image_token_id``): a vision-language model
``vision_tower``    a CLIP-style vision encoder whose attention the method reads
``denoiser``        a diffusers UNet / transformer (a pipeline)
``causal_lm``       a language-model head
``rope``            rotary position embeddings
``cross_attention`` / ``joint_attention``  diffusion attention kinds
``span:NAME``       a user span ``NAME`` marked with ``handle.set_span`` (``--span NAME=TEXT`` on the CLI)
==================  =====================================================================================

(:data:`attnkit.description.FEATURES` is the authoritative list.) Interventions with an empty ``requires`` (the base-class default) are looked up in :data:`FALLBACK_REQUIRES` (the
built-in methods) and are otherwise "unknown": they may run anywhere and read any span. ``span:`` entries follow the instance: an intervention with a ``span`` parameter reads the span
its parameter names.

Example:
    >>> from attnkit.recipes import load_recipe
    >>> n = recipe_needs(load_recipe("pasta"))
    >>> n.kind, n.spans, n.tuned_for
    ('LLM/VLM', ('emphasis',), None)
    >>> recipe_needs(load_recipe("pag-sd")).kind
    'diffusion'
"""

from __future__ import annotations

from dataclasses import dataclass

_TEXT, _IMAGE, _VISION, _DENOISER = "text_decoder", "image_tokens", "vision_tower", "denoiser"

#: ``requires`` of the built-in interventions, used until (or where) a class declares its own
FALLBACK_REQUIRES: dict[str, frozenset[str]] = {
    "noop": frozenset({_TEXT}),
    "head-temperature": frozenset({_TEXT}),
    "head-mask": frozenset({_TEXT}),
    "head-output-recorder": frozenset({_TEXT}),
    "act": frozenset({_TEXT}),
    "streaming-llm": frozenset({_TEXT, "rope"}),
    "kv-retention": frozenset({_TEXT}),
    "pasta": frozenset({_TEXT, "span:emphasis"}),
    "var": frozenset({_TEXT, _IMAGE}),
    "fastv": frozenset({_TEXT, _IMAGE}),
    "visual-exit": frozenset({_TEXT, _IMAGE}),
    "cmai": frozenset({_TEXT, _IMAGE}),
    "vhr": frozenset({_TEXT, _IMAGE}),
    "vtc-cls": frozenset({_TEXT, _IMAGE, _VISION}),
    "paint": frozenset({_TEXT, _IMAGE, _VISION}),
    "damro": frozenset({_TEXT, _IMAGE, _VISION}),
    "pag": frozenset({_DENOISER}),
    "prompt-to-prompt": frozenset({_DENOISER}),
}


def intervention_requires(iv) -> frozenset[str]:
    """What one Intervention (class or instance) needs; empty when neither it nor the fallback table says.

    Example:
        >>> from attnkit import get_intervention
        >>> sorted(intervention_requires(get_intervention("pasta")(span="question")))
        ['span:question', 'text_decoder']
    """
    declared = getattr(iv, "requires", None)
    # an empty set is the base-class default rather than a declaration: the table knows the built-ins better
    requires = frozenset(declared or FALLBACK_REQUIRES.get(getattr(iv, "name", ""), ()))
    span = getattr(iv, "span", None) if not isinstance(iv, type) else None
    if isinstance(span, str) and any(r.startswith("span:") for r in requires):  # the span its parameter names
        requires = frozenset(r for r in requires if not r.startswith("span:")) | {f"span:{span}"}
    return requires


def model_kind(requires) -> str:
    """``"diffusion"``, ``"VLM"``, ``"LLM/VLM"`` (any language model) or ``"?"`` for a set of requirements.

    Example:
        >>> model_kind({"text_decoder", "image_tokens"}), model_kind({"causal_lm"}), model_kind(set())
        ('VLM', 'LLM/VLM', '?')
    """
    if requires & {_DENOISER, "cross_attention", "joint_attention"}:
        return "diffusion"
    if requires & {_IMAGE, _VISION}:
        return "VLM"
    return "LLM/VLM" if requires & {_TEXT, "causal_lm"} else "?"


@dataclass(frozen=True)
class Needs:
    """What a recipe needs (see the module docstring); ``unknown`` lists methods that declare nothing."""

    kind: str
    requires: frozenset
    spans: tuple
    tuned_for: str | None
    unknown: tuple = ()

    @property
    def needs_image(self) -> bool:
        return self.kind == "VLM"


def recipe_needs(recipe) -> Needs:
    """The :class:`Needs` of a :class:`~attnkit.recipes.Recipe` (its interventions are built, not attached)."""
    requires: set[str] = set()
    unknown = []
    for iv in recipe.build_interventions():
        req = intervention_requires(iv)
        if not req:
            unknown.append(iv.name)
        else:
            requires |= req
    spans = tuple(sorted(r[len("span:"):] for r in requires if r.startswith("span:")))
    kind = model_kind(requires) if not unknown or requires else "?"
    return Needs(kind, frozenset(requires), spans, getattr(recipe, "tuned_for", None), tuple(unknown))
