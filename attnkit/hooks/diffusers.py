"""How attnkit gets inside ``diffusers`` models: each attention module's processor is wrapped, and while the
wrapped processor runs, a ``TorchFunctionMode`` routes its ``F.scaled_dot_product_attention`` call to the layer's
plan. Projections, norms, RoPE and the output projection stay the stock processor's own code, so every processor
that calls SDPA works (UNet ``AttnProcessor2_0``, SD3 ``JointAttnProcessor2_0``, Flux, DiT/PixArt).

Keys are labelled per call: cross-attention keys are ``text``; self-attention keys ``image``; joint attention
concatenates both (SD3: image then text; Flux and CogVideoX: text then image, including Flux's single-stream blocks,
whose text length is read from the denoiser's ``encoder_hidden_states``).

Video denoisers: AnimateDiff's ``UNetMotionModel`` runs spatial attention per frame (batch ``B·F``) and temporal
attention per location (``motion_modules.*``: batch ``B·h·w``, queries = frames); CogVideoX attends jointly over
``[text; all frames]``. The description has the feature ``video``, ``temporal_attention`` where temporal modules exist,
and ``extra["temporal_layers"]`` (their layer indices). Every context carries the call's scheduler ``timestep``.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attnkit.description import Component, ModelDescription
from attnkit.hooks.runtime import Adapter, Site, attend
from attnkit.interventions.base import AttentionContext

DENOISER_NAMES = ("unet", "transformer", "prior", "decoder")
#: denoiser classes that denoise videos (a class name containing "Video" also counts)
VIDEO_DENOISERS = ("UNetMotionModel", "UNet3DConditionModel", "UNetSpatioTemporalConditionModel",
                   "I2VGenXLUNet", "CogVideoXTransformer3DModel", "WanTransformer3DModel", "MochiTransformer3DModel",
                   "LTXVideoTransformer3DModel", "HunyuanVideoTransformer3DModel", "ConsisIDTransformer3DModel")
#: module-name parts of temporal attention (each spatial location attends across frames)
TEMPORAL_PARTS = ("motion_modules.", "temp_attentions.", "temporal_transformer_blocks.")
#: joint-attention processors that put the text tokens first ([text; image])
TEXT_FIRST_PROCESSORS = ("Flux", "CogVideoX")


def is_diffusers_object(obj) -> bool:
    try:
        from diffusers import DiffusionPipeline, ModelMixin
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, (DiffusionPipeline, ModelMixin))


def _denoisers(obj) -> list[tuple[str, torch.nn.Module]]:
    from diffusers import ModelMixin

    if isinstance(obj, ModelMixin):
        return [("denoiser", obj)]
    found = [(name, getattr(obj, name)) for name in DENOISER_NAMES if isinstance(getattr(obj, name, None), ModelMixin)]
    if not found:
        raise NotImplementedError(f"{type(obj).__name__} has no unet/transformer component that attnkit can reach")
    return found


def _text_first(processor) -> bool:
    return any(part in type(processor).__name__ for part in TEXT_FIRST_PROCESSORS)


def is_temporal(qualname: str) -> bool:
    """Does the attention module ``qualname`` attend across frames at each spatial location?

    Example:
        >>> is_temporal("up_blocks.1.motion_modules.0.transformer_blocks.0.attn1"), is_temporal("mid_block.attn1")
        (True, False)
    """
    return any(part in qualname for part in TEMPORAL_PARTS)


def _attention_kind(module) -> str:
    if getattr(module, "added_kv_proj_dim", None) is not None or getattr(module, "add_q_proj", None) is not None:
        return "joint"
    if _text_first(module.processor):
        return "joint"  # Flux single-stream blocks and CogVideoX attend over [text, image] hidden states
    if getattr(module, "is_cross_attention", False):
        return "cross"
    return "self"


def find_sites(obj) -> list[Site]:
    sites: list[Site] = []
    for comp_name, denoiser in _denoisers(obj):
        index = 0
        for qualname, module in denoiser.named_modules():
            if hasattr(module, "set_processor") and hasattr(module, "processor") and hasattr(module, "heads"):
                heads = int(module.heads)
                sites.append(Site(qualname, module, index, "denoiser", heads, heads, _attention_kind(module)))
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
    """Wraps a diffusers attention processor; see the module docstring. Holds its adapter strongly: the pipeline's
    modules keep their attachment alive, nothing global does."""

    def __init__(self, original, site: Site, adapter: "DiffusersAdapter"):
        self.original = original
        self.site = site
        self.adapter = adapter

    def __deepcopy__(self, memo):
        """A deep copy of an attached pipeline gets the stock processor back."""
        return copy.deepcopy(self.original, memo)

    def _call(self, attn, hidden_states, *args, **kwargs):
        adapter, site = self.adapter, self.site
        if not adapter.routes(site):
            return self.original(attn, hidden_states, *args, **kwargs)
        encoder = kwargs.get("encoder_hidden_states", args[0] if args else None)
        n_hidden = hidden_states.shape[1]
        n_text = encoder.shape[1] if isinstance(encoder, torch.Tensor) else None
        spans_for = lambda k_len: key_spans(self.original, site.kind, n_hidden, n_text, k_len, adapter.text_len)  # noqa: E731
        with _SDPARouter(lambda *a, **kw: adapter.run_sdpa(site, spans_for, *a, **kw)):
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
    flux_like = _text_first(processor)
    if kind == "cross" or (n_text is not None and kind != "joint" and k_len == n_text):
        text[:] = True
    elif n_text is not None and k_len == n_hidden + n_text:
        if flux_like:
            text[:n_text] = True  # Flux dual-stream, CogVideoX: [text, image]
        else:
            text[n_hidden:] = True  # SD3 joint: [image, text]
    elif flux_like and text_len_hint is not None and k_len > text_len_hint:
        text[:text_len_hint] = True  # Flux single-stream: hidden states are already [text, image]
    return {"text": text, "image": ~text}


def describe(obj, sites: list[Site]) -> ModelDescription:
    """The typed :class:`~attnkit.description.ModelDescription` of a pipeline or denoiser.

    ``extra["pipeline"]`` is the pipeline object when ``obj`` is one (None for a bare denoiser);
    ``extra["temporal_layers"]`` the layer indices of temporal attention modules (see :func:`is_temporal`)."""
    from diffusers import DiffusionPipeline

    first = sites[0]
    kinds = tuple(s.kind for s in sites)
    features = {"denoiser"} | ({"pipeline"} if isinstance(obj, DiffusionPipeline) else set())
    if "cross" in kinds:
        features.add("cross_attention")
    if "joint" in kinds:
        features.add("joint_attention")
    denoiser = _denoisers(obj)[0][1]
    name = type(denoiser).__name__
    if name in VIDEO_DENOISERS or "Video" in name:
        features.add("video")
    temporal = tuple(s.layer for s in sites if is_temporal(s.qualname))
    if temporal:
        features.add("temporal_attention")
    component = Component("denoiser", len(sites), first.num_heads, first.num_kv_heads, None, kinds=kinds,
                          names=tuple(s.qualname for s in sites))
    return ModelDescription(
        framework="diffusers", model_type=type(denoiser).__name__, class_name=type(obj).__name__,
        components={"denoiser": component}, default_component="denoiser", features=frozenset(features),
        extra={"pipeline": obj if isinstance(obj, DiffusionPipeline) else None, "temporal_layers": temporal})


def _timestep_of(args, kwargs) -> float | None:
    """The first timestep value of a denoiser call (``timestep=`` or the second positional argument)."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else None
    return None if t is None else float(t)


class DiffusersAdapter(Adapter):
    """Installs one handle's plans on a diffusers pipeline or model, counts its denoising steps and runs its
    attention calls."""

    framework = "diffusers"
    tracker = None  # no token sequences: spans are per call (text / image keys)

    def __init__(self, obj):
        self.model = obj
        self.sites = find_sites(obj)
        if not self.sites:
            raise NotImplementedError(f"no attention modules with processors found in {type(obj).__name__}")
        self.description = describe(obj, self.sites)
        self.handle = None
        self.captures: list = []
        self.step = 0  # denoiser calls so far
        self.timestep: float | None = None  # the scheduler timestep of the current denoiser call
        self.text_len: int | None = None  # encoder_hidden_states length of the current denoiser call
        self._detached = 0
        self._hooks: list = []
        self._installed: list[tuple[Site, object]] = []  # (site, its original processor)
        self._calls_at_start: dict[int, int] = {}

    def install(self, handle, planned_sites) -> None:
        for site in self.sites:
            if isinstance(site.module.processor, AttnkitProcessor) and site.module.processor.adapter.handle is not None:
                raise ValueError(f"{type(self.model).__name__} overlaps a pipeline or denoiser that is already attached "
                                 f"({site.module.processor.adapter.describe_owner()}); remove that handle first")
        self.handle = handle
        for site in self.sites:  # wrap every site so captures and plans see the same layer numbering
            original = site.module.processor
            site.module.set_processor(_wrapper_for(original)(original, site, self))
            self._installed.append((site, original))
        for _, denoiser in _denoisers(self.model):
            self._hooks.append(denoiser.register_forward_pre_hook(self._pre_denoiser, with_kwargs=True))
            self._hooks.append(denoiser.register_forward_hook(self._post_denoiser, with_kwargs=True, always_call=True))

    def uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for site, original in reversed(self._installed):
            site.module.set_processor(original)
        self._installed.clear()
        self.handle = None

    def __deepcopy__(self, memo):
        """A deep copy of an attached pipeline gets inert step-counting hooks."""
        inert = type(self).__new__(type(self))
        inert.handle, inert._detached, inert.sites, inert.captures, inert.description = None, 0, [], [], None
        return inert

    def _pre_denoiser(self, module, args, kwargs):
        if self._detached or self.handle is None:
            return
        self.step += 1
        self.timestep = _timestep_of(args, kwargs)
        encoder = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.text_len = encoder.shape[1] if isinstance(encoder, torch.Tensor) else None
        self._calls_at_start = self.handle._intervention_calls()

    def _post_denoiser(self, module, args, kwargs, output):
        if self.handle is not None and not self._detached and output is not None:
            self.handle._warn_idle(self._calls_at_start)

    def run_sdpa(self, site: Site, spans_for, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                 scale=None, enable_gqa=False):
        """One intercepted SDPA call inside a diffusers processor. q [B,H,Q,D], k/v [B,Hkv,K,D] → [B,H,Q,D]."""
        batch, _, q_len, head_dim = query.shape
        k_len = key.shape[2]
        scaling = head_dim**-0.5 if scale is None else scale
        spans = {name: m[None].expand(batch, -1).to(query.device) for name, m in spans_for(k_len).items()}

        def make_ctx(entry, rows=None):
            return AttentionContext(
                layer=site.layer, module=site.module, tracker=None, batch=batch, num_heads=site.num_heads,
                q_len=q_len, k_len=k_len, causal=bool(is_causal), device=query.device, step=self.step,
                timestep=self.timestep,
                state=entry.state if entry is not None else {}, spans=spans, query_rows=rows,
                heads=entry.head_mask if entry is not None else None, value=value)

        def stock():
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

        return attend(self, site, query, key, value, attn_mask, scaling=scaling, causal=bool(is_causal),
                      softcap=None, dropout=dropout_p, make_ctx=make_ctx, stock=stock, call_index=self.step)
