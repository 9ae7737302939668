"""What attnkit knows about an attached model: a typed description built once by the framework adapter.

Interventions read it in :meth:`~attnkit.Intervention.setup` (layer and head counts, the configs, the image token)
and declare in :attr:`~attnkit.Intervention.requires` which :data:`FEATURES` they need; :func:`attnkit.attach`
refuses, with one sentence, a recipe whose interventions need a feature the model lacks.

Example:
    >>> from attnkit.testing import tiny_causal_lm
    >>> from attnkit.hooks.transformers import TransformersAdapter
    >>> d = TransformersAdapter(tiny_causal_lm("llama")).description
    >>> d.framework, d.component("text").num_layers, d.component("text").num_heads, sorted(d.features)
    ('transformers', 2, 4, ['causal_lm', 'rope', 'text_decoder'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: What a model can offer an intervention, with the sentence used when it is missing.
FEATURES = {
    "text_decoder": "a transformers language model (a text decoder whose attention goes through AttentionInterface)",
    "causal_lm": "a language-model head (a *ForCausalLM / *ForConditionalGeneration model)",
    "rope": "rotary position embeddings",
    "image_tokens": "image tokens in the text sequence (a vision-language model with config.image_token_id)",
    "vision_tower": "a vision tower whose attention attnkit can reach (LLaVA-style CLIP/SigLIP encoders)",
    "clip_cls_tower": "a CLIP vision tower with a [CLS] token and one un-cropped image per sample (LLaVA-1.5 style)",
    "denoiser": "a diffusers denoiser (a pipeline, UNet or diffusion transformer)",
    "pipeline": "a diffusers pipeline (with its tokenizer and scheduler), not a bare denoiser",
    "cross_attention": "cross-attention from image latents to text tokens (UNet, PixArt)",
    "joint_attention": "joint text-image attention (SD3, Flux, CogVideoX)",
    "video": "a video denoiser (AnimateDiff motion UNet, a text-to-video UNet, or a video transformer such as CogVideoX)",
    "temporal_attention": "temporal attention modules (each spatial location attends across frames: AnimateDiff, "
                          "ModelScope/zeroscope)",
}


@dataclass(frozen=True)
class Component:
    """One attention stack of a model (``text``, ``vision`` or a diffusers ``denoiser``)."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    kinds: tuple[str, ...] = ()  # per layer: "self", "cross" or "joint" (diffusers)
    names: tuple[str, ...] = ()  # per layer: the attention module's qualified name

    @property
    def kv_group(self) -> int:
        """Query heads per KV head (GQA/MQA)."""
        return max(self.num_heads // max(self.num_kv_heads, 1), 1)


@dataclass(frozen=True)
class ModelDescription:
    """Facts about an attached model that interventions may rely on (see the module docstring)."""

    framework: str  # "transformers" or "diffusers"
    model_type: str  # config.model_type, or the denoiser class name
    class_name: str
    components: dict[str, Component]
    default_component: str
    features: frozenset[str] = frozenset()
    config: Any = None  # the model's config (transformers)
    text_config: Any = None  # its text (decoder) config
    image_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # adapter-specific facts (documented where they are set)

    def component(self, name: str | None = None) -> Component:
        """The component ``name`` (default: :attr:`default_component`); KeyError names the ones that exist."""
        name = name or self.default_component
        if name not in self.components:
            raise KeyError(f"this {self.class_name} has no {name!r} attention layers (it has: "
                           f"{', '.join(self.components) or 'none'})")
        return self.components[name]

    def missing(self, requires) -> list[str]:
        """The features of ``requires`` this model lacks (span requirements are checked at run time)."""
        order = list(FEATURES)
        missing = [r for r in requires if not r.startswith("span:") and r not in self.features]
        return sorted(missing, key=lambda r: order.index(r) if r in order else len(order))

    def explain_missing(self, owner: str, requires) -> str | None:
        """One sentence saying what ``owner`` needs that this model lacks, or None when nothing is missing."""
        missing = self.missing(requires)
        if not missing:
            return None
        needs = "; ".join(FEATURES.get(m, m) for m in missing)
        return f"{owner} needs {needs}, which {self.class_name} ({self.model_type}) does not have"
