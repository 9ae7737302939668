"""How attnkit gets inside ``diffusers`` models: each attention module's processor is wrapped, and while the
wrapped processor runs, a ``TorchFunctionMode`` routes its ``F.scaled_dot_product_attention`` call to the layer's
plan. Projections, norms, RoPE and the output projection stay the stock processor's own code, so every processor
that calls SDPA works (UNet ``AttnProcessor2_0``, SD3 ``JointAttnProcessor2_0``, Flux, DiT/PixArt).

Keys are labelled per call: cross-attention keys are ``text``; self-attention keys ``image``; joint attention
concatenates both (SD3: image then text; Flux: text then image, including single-stream blocks, whose text length
is read from the denoiser's ``encoder_hidden_states``).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

DENOISER_NAMES = ("unet", "transformer", "prior", "decoder")


def is_diffusers_object(obj) -> bool:
    try:
        from diffusers import DiffusionPipeline, ModelMixin
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, (DiffusionPipeline, ModelMixin))


@dataclass
class DiffusersSite:
    qualname: str
    module: torch.nn.Module
    layer: int
    component: str
    num_heads: int
    num_kv_heads: int
    kind: str  # "self", "cross" or "joint"
    handle: Any = None
    entries: list = field(default_factory=list)
    backend: Any = None
    original_processor: Any = None


def _denoisers(obj) -> list[tuple[str, torch.nn.Module]]:
    from diffusers import ModelMixin

    if isinstance(obj, ModelMixin):
        return [("denoiser", obj)]
    found = [(name, getattr(obj, name)) for name in DENOISER_NAMES if isinstance(getattr(obj, name, None), ModelMixin)]
    if not found:
        raise NotImplementedError(f"{type(obj).__name__} has no unet/transformer component that attnkit can reach")
    return found


def _attention_kind(module) -> str:
    if getattr(module, "added_kv_proj_dim", None) is not None or getattr(module, "add_q_proj", None) is not None:
        return "joint"
    if "Flux" in type(module.processor).__name__:
        return "joint"  # Flux single-stream blocks attend over [text, image] hidden states
    if getattr(module, "is_cross_attention", False):
        return "cross"
    return "self"


def find_sites(obj) -> list[DiffusersSite]:
    sites: list[DiffusersSite] = []
    for comp_name, denoiser in _denoisers(obj):
        index = 0
        for qualname, module in denoiser.named_modules():
            if hasattr(module, "set_processor") and hasattr(module, "processor") and hasattr(module, "heads"):
                heads = int(module.heads)
                sites.append(DiffusersSite(qualname, module, index, "denoiser", heads, heads, _attention_kind(module)))
                index += 1
    return sites


class _SDPARouter(TorchFunctionMode):
    """Sends ``F.scaled_dot_product_attention`` calls made by one processor call to the handle."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:  # the mode is off inside this call: no re-entry
            return self.run(*args, **kwargs)
        return func(*args, **kwargs)


_WRAPPER_CLASSES: dict[type, type] = {}


class AttnkitProcessor:
    """Wraps a diffusers attention processor; see the module docstring."""

    def __init__(self, original, site: DiffusersSite, handle):
        self.original = original
        self.site = site
        self.handle = weakref.proxy(handle)

    def _call(self, attn, hidden_states, *args, **kwargs):
        handle, site = self.handle, self.site
        if not handle.active_for(site):
            return self.original(attn, hidden_states, *args, **kwargs)
        encoder = kwargs.get("encoder_hidden_states", args[0] if args else None)
        n_hidden = hidden_states.shape[1]
        n_text = encoder.shape[1] if isinstance(encoder, torch.Tensor) else None
        spans_for = lambda k_len: key_spans(self.original, site.kind, n_hidden, n_text, k_len, handle.text_len)  # noqa: E731
        with _SDPARouter(lambda *a, **kw: handle._run_diffusers_sdpa(site, spans_for, *a, **kw)):
            return self.original(attn, hidden_states, *args, **kwargs)


def _wrapper_for(original) -> type:
    """A subclass of AttnkitProcessor whose ``__call__`` has the original's signature, because diffusers'
    ``Attention.forward`` drops every kwarg the processor's signature does not name."""
    cls = type(original)
    if cls not in _WRAPPER_CLASSES:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return self._call(attn, hidden_states, *args, **kwargs)

        __call__.__signature__ = inspect.signature(cls.__call__)
        _WRAPPER_CLASSES[cls] = type(f"Attnkit{cls.__name__}", (AttnkitProcessor,), {"__call__": __call__})
    return _WRAPPER_CLASSES[cls]


def key_spans(processor, kind: str, n_hidden: int, n_text: int | None, k_len: int, text_len_hint: int | None):
    """``{"text": [K] bool, "image": [K] bool}`` for one attention call (see the module docstring)."""
    text = torch.zeros(k_len, dtype=torch.bool)
    flux_like = "Flux" in type(processor).__name__
    if kind == "cross" or (n_text is not None and kind != "joint" and k_len == n_text):
        text[:] = True
    elif n_text is not None and k_len == n_hidden + n_text:
        if flux_like:
            text[:n_text] = True  # Flux dual-stream: [text, image]
        else:
            text[n_hidden:] = True  # SD3 joint: [image, text]
    elif flux_like and text_len_hint is not None and k_len > text_len_hint:
        text[:text_len_hint] = True  # Flux single-stream: hidden states are already [text, image]
    return {"text": text, "image": ~text}


class DiffusersAdapter:
    """Installs a handle's plans on a diffusers pipeline or model and undoes it exactly."""

    kind = "diffusers"

    def __init__(self, obj):
        self.obj = obj
        self.sites = find_sites(obj)
        if not self.sites:
            raise NotImplementedError(f"no attention modules with processors found in {type(obj).__name__}")
        self._hooks: list = []
        self._installed: list[DiffusersSite] = []

    def model_info(self) -> dict:
        first = self.sites[0]
        return {"kind": self.kind, "model_type": type(_denoisers(self.obj)[0][1]).__name__,
                "default_component": "denoiser",
                "denoiser": {"num_layers": len(self.sites), "num_heads": first.num_heads,
                             "num_kv_heads": first.num_kv_heads,
                             "kinds": [s.kind for s in self.sites], "names": [s.qualname for s in self.sites]}}

    def install(self, handle, planned_sites) -> None:
        for site in self.sites:  # wrap every site so captures and plans see the same layer numbering
            site.handle = handle
            site.original_processor = site.module.processor
            site.module.set_processor(_wrapper_for(site.original_processor)(site.original_processor, site, handle))
            self._installed.append(site)
        for _, denoiser in _denoisers(self.obj):
            self._hooks.append(denoiser.register_forward_pre_hook(handle._pre_forward_denoiser, with_kwargs=True))

    def uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for site in reversed(self._installed):
            site.module.set_processor(site.original_processor)
            site.handle = None
        self._installed.clear()
