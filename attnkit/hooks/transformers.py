"""How attnkit gets inside ``transformers`` (≥ 5) models: one attention function registered in the
``AttentionInterface`` (and a mask function in ``AttentionMaskInterface`` — without it the function would receive
``attention_mask=None`` and silently lose causality), plus forward pre-hooks that track token spans.

Attaching switches only the configs of the targeted attention modules to ``"attnkit"``; modules without a plan fall
through to the implementation they had before (the exact stock function, with the mask that implementation
expects) when that was ``eager`` or ``sdpa``; a model loaded with a flash-attention implementation runs its unplanned
layers on SDPA while attached (flash kernels want a different mask format). Removing restores each config's previous
value. Nothing is written on the model's modules.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from attnkit.hooks import compat

IMPL_NAME = "attnkit"

#: Families whose attention goes through transformers' AttentionInterface and that the test-suite covers.
TESTED_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
    "llava", "llava_next", "qwen2_vl", "idefics3",
)


@dataclass
class AttentionSite:
    """One attention module inside a model: where it is and how to reach its stock implementation."""

    qualname: str
    module: torch.nn.Module
    layer: int
    component: str  # "text" or "vision"
    num_heads: int
    num_kv_heads: int
    handle: Any = None
    entries: list = field(default_factory=list)
    backend: Any = None
    original_impl: str | None = None


_SITES: "weakref.WeakKeyDictionary[torch.nn.Module, AttentionSite]" = weakref.WeakKeyDictionary()
_ORIGINAL_IMPL_BY_CONFIG: dict[int, tuple[Any, str]] = {}  # id(config) -> (weakref(config), original impl)
_REGISTERED = False


# ---- stock fallbacks -----------------------------------------------------------------------------------------
def _stock_function(module: torch.nn.Module, impl: str | None):
    """The stock attention function for ``module``: the model's own eager function for ``eager``, transformers'
    SDPA function otherwise (see :func:`attnkit_mask` for the masks each receives)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl in (None, "eager"):
        fn = compat.model_eager_function(module)
        if fn is not None:
            return fn
    # our mask function hands out sdpa-format masks for every other implementation (see attnkit_mask), so only
    # sdpa itself can take them; flash / flex implementations run on SDPA while attached
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _original_impl_of(config) -> str | None:
    entry = _ORIGINAL_IMPL_BY_CONFIG.get(id(config))
    if entry is not None and entry[0]() is config:
        return entry[1]
    return None


def attnkit_mask(*args, **kwargs):
    """Mask function for ``"attnkit"``: exactly the mask the config's previous implementation would get
    (``eager_mask`` for eager, ``sdpa_mask`` — bool or None — otherwise)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    original = _original_impl_of(kwargs.get("config"))
    name = "eager" if original == "eager" else "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[name](*args, **kwargs)


def attnkit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: run the module's plan, or fall through to its stock implementation.

    q [B,H,Q,D], k/v [B,Hkv,K,D]; returns ``(out [B,Q,H,D], None)`` like transformers' own functions."""
    site = _SITES.get(module)
    if site is None or site.handle is None or not site.handle.active_for(site):
        impl = site.original_impl if site is not None else _original_impl_of(getattr(module, "config", None))
        return _stock_function(module, impl)(module, query, key, value, attention_mask, scaling=scaling,
                                             dropout=dropout, **kwargs)
    return site.handle._run_site(site, query, key, value, attention_mask, scaling, dropout, kwargs)


def register_attnkit() -> None:
    """Register the attention and mask functions once per process (the interface has no unregister)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL_NAME, attnkit_attention)
    AttentionMaskInterface.register(IMPL_NAME, attnkit_mask)
    _REGISTERED = True


# ---- discovery ---------------------------------------------------------------------------------------------
def is_transformers_model(obj) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, PreTrainedModel)


def _heads_of(module, config) -> tuple[int, int]:
    head_dim = getattr(module, "head_dim", None)
    num_heads = getattr(config, "num_attention_heads", None) or getattr(module, "num_heads", None)
    if num_heads is None:
        num_heads = getattr(config, "n_head", None) or getattr(config, "num_heads", None)
    kv_groups = getattr(module, "num_key_value_groups", 1) or 1
    del head_dim
    return int(num_heads), int(num_heads) // int(kv_groups)


def find_sites(model) -> list[AttentionSite]:
    """All attention modules that dispatch through the AttentionInterface, per component, in layer order."""
    config = model.config
    text_config = config.get_text_config(decoder=True)
    vision_config = getattr(config, "vision_config", None)
    sites: list[AttentionSite] = []
    vision_count = 0
    for qualname, module in model.named_modules():
        if not type(module).__name__.endswith("Attention") or not hasattr(module, "config"):
            continue
        mod_config = module.config
        if mod_config is text_config and isinstance(getattr(module, "layer_idx", None), int):
            h, hkv = _heads_of(module, mod_config)
            sites.append(AttentionSite(qualname, module, module.layer_idx, "text", h, hkv))
        elif vision_config is not None and mod_config is vision_config:
            h, hkv = _heads_of(module, mod_config)
            sites.append(AttentionSite(qualname, module, vision_count, "vision", h, hkv))
            vision_count += 1
    return sites


def check_supported(model, sites: list[AttentionSite]) -> None:
    """Raise a clear error for models whose attention does not go through the AttentionInterface."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    supports = compat.supports_attention_interface(model)
    text_sites = [s for s in sites if s.component == "text"]
    if not supports or not text_sites:
        raise NotImplementedError(
            f"{type(model).__name__} (model_type={model_type!r}) does not route attention through transformers' "
            f"AttentionInterface, so attnkit cannot reach it. Supported and tested families: "
            f"{', '.join(TESTED_FAMILIES)} (most other families with `_supports_attention_backend = True` work too)."
        )


def text_model_of(model) -> torch.nn.Module | None:
    """The decoder stack (the module owning the text layers), e.g. ``LlamaModel`` or a VLM's language model."""
    text_config = model.config.get_text_config(decoder=True)
    for _, module in model.named_modules():
        if module is not model and getattr(module, "config", None) is text_config and hasattr(module, "layers"):
            return module
    return None


# ---- install / uninstall -----------------------------------------------------------------------------------
class TransformersAdapter:
    """Installs a handle's plans on a transformers model and undoes it exactly."""

    kind = "transformers"

    def __init__(self, model):
        self.model = model
        self.sites = find_sites(model)
        check_supported(model, self.sites)
        self._hooks: list = []
        self._configs: list[tuple[Any, str]] = []

    def model_info(self) -> dict:
        config = self.model.config
        text = config.get_text_config(decoder=True)
        info = {"kind": self.kind, "model_type": getattr(config, "model_type", None), "config": config,
                "default_component": "text"}
        for comp in ("text", "vision"):
            comp_sites = [s for s in self.sites if s.component == comp]
            if comp_sites:
                info[comp] = {"num_layers": max(s.layer for s in comp_sites) + 1, "num_heads": comp_sites[0].num_heads,
                              "num_kv_heads": comp_sites[0].num_kv_heads}
        info["image_token_id"] = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
        info["text_config"] = text
        return info

    def install(self, handle, planned_sites: list[AttentionSite]) -> None:
        register_attnkit()
        configs = {}
        for site in planned_sites:
            configs[id(site.module.config)] = site.module.config
        for site in self.sites:  # every site of a switched config must know its stock implementation
            if id(site.module.config) in configs:
                site.original_impl = compat.attn_implementation(site.module.config)
                site.handle = handle
                _SITES[site.module] = site
        for config in configs.values():
            previous = compat.attn_implementation(config)
            self._configs.append((config, previous))
            _ORIGINAL_IMPL_BY_CONFIG[id(config)] = (weakref.ref(config), previous)
            compat.set_attn_implementation(config, IMPL_NAME)
        self._add_tracking_hooks(handle)

    def _add_tracking_hooks(self, handle) -> None:
        outer = self.model
        self._hooks.append(outer.register_forward_pre_hook(handle._pre_forward_outer, with_kwargs=True))
        self._hooks.append(outer.register_forward_hook(handle._post_forward_outer, with_kwargs=True, always_call=True))
        inner = text_model_of(outer)
        if inner is not None and inner is not outer:
            self._hooks.append(inner.register_forward_pre_hook(handle._pre_forward_inner, with_kwargs=True))

    def uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for config, previous in reversed(self._configs):
            compat.set_attn_implementation(config, previous)
            _ORIGINAL_IMPL_BY_CONFIG.pop(id(config), None)
        self._configs.clear()
        for site in self.sites:
            if _SITES.get(site.module) is site:
                del _SITES[site.module]
            site.handle = None
