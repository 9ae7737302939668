"""How attnkit gets inside ``transformers`` (≥ 5) models, and the runtime of one attachment.

* **Dispatch.** One attention function is registered in ``AttentionInterface`` under ``"attnkit"`` (and a mask
  function in ``AttentionMaskInterface``, for models that build masks from an attention module's config). Attaching
  gives each attention module of a targeted stack its **own shallow copy of its config** switched to ``"attnkit"``;
  the shared config object is never changed, so another model sharing it, or a ``copy.deepcopy`` made while
  attached, keeps its stock attention. The model still builds its masks from its own (unchanged) config, so the
  function receives exactly the mask the previous implementation expects. Modules without a plan, and modules that
  are not part of a live attachment (a deep copy), fall through to that previous implementation: the model's own
  ``eager_attention_forward`` for ``eager``, transformers' SDPA function otherwise (flash/flex-loaded models run
  unplanned layers on SDPA while attached). ``remove()`` puts the original config objects back.
* **Tracking.** A forward pre-hook on the outer model (and one on the text decoder, for direct calls to it)
  records the new tokens of every call in a :class:`~attnkit.spans.SequenceTracker`: how many tokens came before
  the call comes from the 2-D attention mask ``generate`` passes (see :func:`attnkit.hooks.compat.past_length`).
  There is no call-depth counter, so a failed or interrupted call leaves nothing to unwind.
* **Ownership.** A module belongs to at most one live attachment; attaching a model, or a part of one, whose
  attention modules are already attached is refused. The global module → site map holds neither the model nor the
  handle strongly (the model's own hooks keep its handle alive), so an attached model is freed like any other.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from typing import Any

import torch

from attnkit.description import Component, ModelDescription
from attnkit.hooks import compat
from attnkit.hooks.runtime import Adapter, Site, attend
from attnkit.interventions.base import AttentionContext
from attnkit.spans import SequenceTracker

IMPL_NAME = "attnkit"
# set on attnkit's own config copies only: the implementation they replaced, and the config they copy
_PREVIOUS = "_attnkit_previous_implementation"
_ORIGINAL = "_attnkit_original_config"

#: Families whose attention goes through transformers' AttentionInterface and that the test-suite covers.
TESTED_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
    "llava", "llava_next", "qwen2_vl", "idefics3", "gemma3",
)

#: module -> (weakref to its Site, weakref to the adapter running it); weak keys and values: nothing here keeps
#: a model alive.
_OWNER: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_REGISTERED = False


# ---- dispatch --------------------------------------------------------------------------------------------------
def _stock_function(module: torch.nn.Module, impl: str | None):
    """The stock attention function for ``module`` under implementation ``impl`` (see the module docstring)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl in (None, "eager"):
        fn = compat.model_eager_function(module)
        if fn is not None:
            return fn
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def config_of(module: torch.nn.Module):
    """An attention module's own config: the original behind an attnkit copy (also in a deep copy of an
    attached model)."""
    config = getattr(module, "config", None)
    return getattr(config, _ORIGINAL, config)


def previous_implementation(config) -> str | None:
    """The implementation an attnkit config copy replaced (None for any other config)."""
    return getattr(config, _PREVIOUS, None)


def attnkit_mask(*args, **kwargs):
    """Mask function for ``"attnkit"``: exactly the mask of the implementation the config copy replaced."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = "eager" if previous_implementation(kwargs.get("config")) == "eager" else "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[name](*args, **kwargs)


def attnkit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: run the module's plan, or fall through to its stock implementation.

    q [B,H,Q,D], k/v [B,Hkv,K,D]; returns ``(out [B,Q,H,D], None)`` like transformers' own functions."""
    owner = _OWNER.get(module)
    site, adapter = (owner[0](), owner[1]()) if owner is not None else (None, None)
    if site is None or adapter is None or not adapter.routes(site):
        impl = previous_implementation(getattr(module, "config", None))
        return _stock_function(module, impl)(module, query, key, value, attention_mask, scaling=scaling,
                                             dropout=dropout, **kwargs)
    return adapter.run_site(site, query, key, value, attention_mask, scaling, dropout, kwargs)


def register_attnkit() -> None:
    """Register the attention and mask functions once per process (the interfaces have no unregister)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL_NAME, attnkit_attention)
    AttentionMaskInterface.register(IMPL_NAME, attnkit_mask)
    _REGISTERED = True


# ---- discovery ---------------------------------------------------------------------------------------------------
def is_transformers_model(obj) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, PreTrainedModel)


def _heads_of(module, config) -> tuple[int, int]:
    num_heads = getattr(config, "num_attention_heads", None) or getattr(module, "num_heads", None)
    if num_heads is None:
        num_heads = getattr(config, "n_head", None) or getattr(config, "num_heads", None)
    kv_groups = getattr(module, "num_key_value_groups", 1) or 1
    return int(num_heads), int(num_heads) // int(kv_groups)


def find_sites(model) -> list[Site]:
    """All attention modules that dispatch through the AttentionInterface, per component, in layer order."""
    config = model.config
    text_config = config.get_text_config(decoder=True)
    vision_config = getattr(config, "vision_config", None)
    sites: list[Site] = []
    vision_count = 0
    for qualname, module in model.named_modules():
        if not type(module).__name__.endswith("Attention") or not hasattr(module, "config"):
            continue
        mod_config = config_of(module)
        if mod_config is text_config and isinstance(getattr(module, "layer_idx", None), int):
            h, hkv = _heads_of(module, mod_config)
            sites.append(Site(qualname, module, module.layer_idx, "text", h, hkv))
        elif vision_config is not None and mod_config is vision_config:
            h, hkv = _heads_of(module, mod_config)
            sites.append(Site(qualname, module, vision_count, "vision", h, hkv))
            vision_count += 1
    return sites


def check_supported(model, sites: list[Site]) -> None:
    """Raise a clear error for models whose attention does not go through the AttentionInterface."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if not compat.supports_attention_interface(model) or not any(s.component == "text" for s in sites):
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


def describe(model, sites: list[Site]) -> ModelDescription:
    """The typed :class:`~attnkit.description.ModelDescription` of a transformers model."""
    config = model.config
    text = config.get_text_config(decoder=True)
    components = {}
    for name in ("text", "vision"):
        comp = [s for s in sites if s.component == name]
        if comp:
            head_dim = getattr(comp[0].module, "head_dim", None)
            components[name] = Component(name, max(s.layer for s in comp) + 1, comp[0].num_heads,
                                         comp[0].num_kv_heads, head_dim, names=tuple(s.qualname for s in comp))
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    features = {"text_decoder"}
    if model.get_output_embeddings() is not None:
        features.add("causal_lm")
    if _has_rope(model):
        features.add("rope")
    if image_token_id is not None:
        features.add("image_tokens")
    if "vision" in components:
        features.add("vision_tower")
        vision_type = getattr(getattr(config, "vision_config", None), "model_type", None)
        if config.model_type == "llava" and vision_type == "clip_vision_model":
            features.add("clip_cls_tower")
    return ModelDescription(
        framework="transformers", model_type=str(getattr(config, "model_type", "")), class_name=type(model).__name__,
        components=components, default_component="text", features=frozenset(features), config=config,
        text_config=text, image_token_id=image_token_id)


def _has_rope(model) -> bool:
    """Any rotary embedding: ``inv_freq``, or per-layer-type ``<type>_inv_freq`` buffers (Gemma-3)."""
    return any(name.endswith("inv_freq") for m in model.modules() for name, _ in m.named_buffers(recurse=False))


def claim(modules, adapter) -> None:
    """Refuse modules another live attachment owns (see the module docstring)."""
    for module in modules:
        owner = _OWNER.get(module)
        other = owner[1]() if owner is not None else None
        if other is not None and other is not adapter and other.handle is not None:
            raise ValueError(
                f"{type(adapter.model).__name__} overlaps a model that is already attached ({other.describe_owner()}); "
                "remove that handle first, or attach one recipe holding all interventions")


# ---- one attachment -------------------------------------------------------------------------------------------------
class TransformersAdapter(Adapter):
    """Installs one handle's plans on a transformers model, tracks its sequences and runs its attention calls."""

    framework = "transformers"

    def __init__(self, model):
        self.model = model
        self.sites = find_sites(model)
        check_supported(model, self.sites)
        self.description = describe(model, self.sites)
        self.tracker = SequenceTracker(image_token_id=self.description.image_token_id)
        self.handle = None
        self.captures: list = []
        self._detached = 0
        self._observed_by_outer = False
        self._hooks: list = []
        self._swapped: list[tuple[torch.nn.Module, Any]] = []  # (module, its original config)
        self._calls_at_start: dict[int, int] = {}

    # ---- install / uninstall ------------------------------------------------------------------------------------
    def install(self, handle, planned_sites: list[Site]) -> None:
        """Route every attention module through attnkit and start tracking (see the module docstring); modules
        without a plan fall through to their stock implementation."""
        claim([s.module for s in self.sites], self)
        register_attnkit()
        copies: dict[int, Any] = {}  # one config copy per original config
        self.handle = handle
        for site in self.sites:  # every stack is routed, so captures reach any layer
            original = config_of(site.module)
            if id(original) not in copies:
                switched = copy.copy(original)
                setattr(switched, _PREVIOUS, compat.attn_implementation(original))
                setattr(switched, _ORIGINAL, original)
                compat.set_attn_implementation(switched, IMPL_NAME)
                copies[id(original)] = switched
            self._swapped.append((site.module, original))
            site.module.config = copies[id(original)]
            _OWNER[site.module] = (weakref.ref(site), weakref.ref(self))
        self._add_tracking_hooks()

    def _add_tracking_hooks(self) -> None:
        outer = self.model
        self._hooks.append(outer.register_forward_pre_hook(self._pre_outer, with_kwargs=True))
        self._hooks.append(outer.register_forward_hook(self._post_outer, with_kwargs=True, always_call=True))
        inner = text_model_of(outer)
        if inner is not None:
            self._hooks.append(inner.register_forward_pre_hook(self._pre_inner, with_kwargs=True))

    def uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, original in reversed(self._swapped):
            module.config = original
            owner = _OWNER.get(module)
            if owner is not None and owner[1]() is self:
                del _OWNER[module]
        self._swapped.clear()
        self.handle = None

    def __deepcopy__(self, memo):
        """A deep copy of an attached model gets inert tracking hooks (and its modules fall through to stock)."""
        inert = type(self).__new__(type(self))
        inert.handle, inert._detached, inert._observed_by_outer = None, 0, False
        inert.tracker, inert.sites, inert.captures, inert.description = None, [], [], None
        return inert

    # ---- tracking -------------------------------------------------------------------------------------------------
    def _observe(self, module, args, kwargs) -> None:
        bound = _bind(module, args, kwargs)
        ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            batch, new_len = ids.shape
        elif isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
            ids, (batch, new_len) = None, embeds.shape[:2]
        else:
            return
        tracked = self.tracker.length if self.tracker.batch == batch else None
        past = compat.past_length(bound, new_len, tracked)
        mask = bound.get("attention_mask")  # a decoder may get a dict of prebuilt masks: only a 2-D one is read
        self.tracker.observe(ids, mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None, past,
                             batch, new_len)

    def _pre_outer(self, module, args, kwargs):
        if self._detached or self.handle is None:
            return
        self._observed_by_outer = False
        self._observe(module, args, kwargs)
        self._observed_by_outer = True
        self._calls_at_start = self.handle._intervention_calls()

    def _pre_inner(self, module, args, kwargs):
        if self._detached or self.handle is None:
            return
        if self._observed_by_outer:  # reached through the outer model, whose hook already observed the call
            self._observed_by_outer = False
            return
        self._observe(module, args, kwargs)

    def _post_outer(self, module, args, kwargs, output):
        """Runs also when the forward raised (``always_call``)."""
        if self._detached:  # the end of a nested detached call says nothing about the tracked one around it
            return
        self._observed_by_outer = False
        if self.handle is not None and not self._detached and output is not None:
            self.handle._warn_idle(self._calls_at_start)

    # ---- running a site ---------------------------------------------------------------------------------------------
    def make_context(self, site: Site, entry, q_len, k_len, batch, device, causal, window, rows=None,
                     value=None, query=None, key=None) -> AttentionContext:
        tracker = self.tracker
        if entry is not None and entry.state.get("_sequence") != tracker.sequence_id:
            entry.state.clear()
            entry.state["_sequence"] = tracker.sequence_id
        return AttentionContext(
            layer=site.layer, module=site.module, tracker=tracker, batch=batch, num_heads=site.num_heads,
            q_len=q_len, k_len=k_len, causal=causal, device=device, window=window, is_prefill=tracker.last_was_prefill,
            step=tracker.forward_index, state=entry.state if entry is not None else {}, query_rows=rows,
            heads=entry.head_mask if entry is not None else None, value=value, query=query, key=key)

    def run_site(self, site: Site, query, key, value, attention_mask, scaling, dropout, kwargs):
        """Attention for one module with its plan. q [B,H,Q,D], k/v [B,Hkv,K,D] → ([B,Q,H,D], None)."""
        batch, _, q_len, head_dim = query.shape
        k_len = key.shape[2]
        scaling = head_dim**-0.5 if scaling is None else scaling
        causal = kwargs.get("is_causal", getattr(site.module, "is_causal", True))
        window = kwargs.get("sliding_window")
        dropout = dropout if site.module.training else 0.0

        def make_ctx(entry, rows=None):
            return self.make_context(site, entry, q_len, k_len, batch, query.device, causal, window, rows, value,
                                     query, key)

        def stock():
            impl = previous_implementation(site.module.config)
            out, _ = _stock_function(site.module, impl)(site.module, query, key, value, attention_mask,
                                                         scaling=scaling, dropout=dropout, **kwargs)
            return out.transpose(1, 2)  # [B, H, Q, D] like the backends

        out = attend(self, site, query, key, value, attention_mask, scaling=scaling, causal=causal,
                     softcap=kwargs.get("softcap"), dropout=dropout, make_ctx=make_ctx, stock=stock,
                     call_index=self.tracker.forward_index)
        return out.transpose(1, 2).contiguous(), None  # [B, Q, H, D]


_SIGNATURES: dict[type, inspect.Signature] = {}


def _bind(module, args, kwargs) -> dict:
    """A forward call's arguments by name (positional ones included)."""
    if not args:
        return kwargs
    cls = type(module)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(module.forward)
    signature = _SIGNATURES[cls]
    try:
        named = dict(signature.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return {"input_ids": args[0], **kwargs} if isinstance(args[0], torch.Tensor) else kwargs
    for name, param in signature.parameters.items():  # flatten **kwargs
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named
