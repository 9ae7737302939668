"""StyleID — "Style Injection in Diffusion" (Chung et al., CVPR 2024; repo jiwoogit/StyleID): training-free style
transfer by injecting a style image's self-attention keys/values into the sampling of a content image.

Both images are DDIM-inverted with an empty prompt; the content inversion stores the decoder self-attention queries,
the style inversion the keys and values (an :class:`~attnkit.diffusion.store.AttentionStore` each, keyed by
timestep). Sampling starts from ``AdaIN(z_c, z_s)`` with an empty prompt and no CFG; in the injected layers::

    q̃ = γ·q_c + (1 − γ)·q_cs        K = k_s, V = v_s        attn = softmax(τ · q̃ Kᵀ / √d)

(γ = 0.75 query preservation, τ = 1.5 attention temperature, τ folded into q so SDPA stays fused; layers without
injection run normally, with no τ). METHODS.md §3 and METHODS-2.md §5.1.

Defaults follow the paper's LDM code (preset ``styleid``): SD-1.4 ``output_blocks`` 6–11 = ``up_blocks.2``/``.3``
self-attention (:func:`~attnkit.interventions.editing._common.late_self_layers`; the second half of the blocks in
a transformer), Convention B inversion with 50 steps, AdaIN per channel over ``(B, H, W)`` with the unbiased std,
and the first sampling step (t = 981) skipped entirely. The diffusers port's behaviour (layers 7–11, Convention A,
AdaIN over ``(H, W)`` with ``std + 1e-4``, injection at every step, 20 steps, SD-2.1-base) is the preset
``styleid-diffusers``. On joint-attention models (SD3, Flux) only the image tokens' queries are blended and only the
image keys/values replaced; text keys stay the sample's own.

Sources: ``content``/``style`` are AttentionStores (what :func:`transfer` builds), ``"self"`` (this pass: with
``tau=1`` that reproduces the stock model, the conformance suite's neutral setting) or a sample index of the batch.

Example (the whole protocol on a tiny SD pipeline; random weights, so the picture shows mechanics only):
    >>> import torch
    >>> from attnkit.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sd")
    >>> out = transfer(pipe, torch.rand(1, 3, 8, 8) * 2 - 1, torch.rand(1, 3, 8, 8) * 2 - 1, num_inference_steps=5)
    >>> out.latents.shape, out.injected_calls > 0, out.content_store.memory()["by_tensor"].keys()
    (torch.Size([1, 4, 8, 8]), True, dict_keys(['q']))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.diffusion.inject import blend_queries, replace_kv, scale_queries
from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.editing._common import (
    EditingIntervention,
    check_source,
    check_steps,
    in_steps,
    resolve_source,
)

ADAIN = ("ldm", "diffusers", "none")


@register_intervention
class StyleID(EditingIntervention, Intervention):
    name = "styleid"
    description = "StyleID: style K/V injection with query preservation and attention temperature"
    requires = frozenset({"denoiser"})
    conformance = {"neutral": {"content": "self", "style": "self", "tau": 1.0},
                   "active": {"content": "self", "style": "self", "tau": 1.5}}

    def __init__(self, gamma: float = 0.75, tau: float = 1.5, content=None, style=None, samples=None,
                 steps=None, inversion: str = "B", adain: str = "ldm", skip_first_step: bool = True,
                 num_inference_steps: int = 50, num_steps: int | None = None, cfg: bool | None = None, **target):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"styleid: gamma (query preservation) must be in [0, 1], got {gamma}")
        if tau <= 0:
            raise ValueError(f"styleid: tau (attention temperature) must be > 0, got {tau}")
        if inversion not in ("A", "B"):
            raise ValueError(f"styleid: inversion must be 'A' (diffusers port) or 'B' (LDM code), got {inversion!r}")
        if adain not in ADAIN:
            raise ValueError(f"styleid: adain must be one of {ADAIN}, got {adain!r}")
        super().__init__(**target)
        self._init_editing(num_steps, cfg)
        self.gamma, self.tau = float(gamma), float(tau)
        self.content = None if content is None else check_source(content, "styleid", "content")
        self.style = None if style is None else check_source(style, "styleid", "style")
        self.samples = None if samples is None else list(samples)
        self.steps = check_steps(steps, "styleid")
        self.inversion, self.adain, self.skip_first_step = inversion, adain, bool(skip_first_step)
        self.num_inference_steps = int(num_inference_steps)
        self.injected_calls = 0

    def setup(self, model) -> None:
        if self.content is None or self.style is None:
            raise ValueError("styleid needs content= and style= sources (AttentionStores filled by DDIM inversion; "
                             "attnkit.interventions.editing.styleid.transfer() builds them)")
        super().setup(model)

    def set_references(self, content=None, style=None) -> None:
        """Point the method at new stores (e.g. another content image) without re-attaching."""
        if content is not None:
            self.content = check_source(content, "styleid", "content")
        if style is not None:
            self.style = check_source(style, "styleid", "style")

    def edit_kv(self, q, k, v, ctx):
        """q [B,H,Q,D], k/v [B,H,K,D] → blended and scaled q, the style's k/v."""
        info = self.call
        if info is not None and not in_steps(info.step, info.num_steps, self.steps):
            return None
        q_c = resolve_source(self.content, ctx, "q", self._names, q, info)
        k_s = resolve_source(self.style, ctx, "k", self._names, k, info)
        v_s = resolve_source(self.style, ctx, "v", self._names, v, info)
        if q_c is None or k_s is None or v_s is None:
            self._calls.warn(("missing", ctx.timestep), f"styleid: no stored content/style tensors for timestep "
                                                        f"{ctx.timestep}; that step runs without injection")
            return None
        rows = None if self.samples is None or info is None else info.edited_rows(q.shape[0], self.samples).to(q.device)
        joint = self._kinds[ctx.layer] == "joint"
        image_q = ctx.query_mask("image")[0] if joint else None  # [Q] bool
        image_k = ctx.key_mask("image")[0] if joint else None  # [K] bool
        q = scale_queries(blend_queries(q, q_c, self.gamma, rows, image_q), self.tau, rows, image_q)
        k, v = replace_kv(k, v, k_s, v_s, rows, keys=image_k)
        self.injected_calls += 1
        return q, k, v, None


# ---- the protocol ---------------------------------------------------------------------------------------------------
@dataclass
class StyleTransfer:
    """What :func:`transfer` returns: the stylised latents (and images unless ``output_type="latent"``), the two
    stores, the two inversions and how many attention calls received the injection."""

    latents: torch.Tensor
    images: torch.Tensor | None
    content_store: object
    style_store: object
    content_inversion: object
    style_inversion: object
    injected_calls: int
    initial_latent: torch.Tensor


def _method_from(preset: str | None, overrides: dict) -> StyleID:
    """A StyleID built from a preset's parameters and target, with ``overrides`` (None values ignored)."""
    params: dict = {}
    target: dict = {}
    if preset is not None:
        from attnkit.recipes import load_recipe

        entries = [e for e in load_recipe(preset).interventions if e["method"] == "styleid"]
        if not entries:
            raise ValueError(f"styleid: preset {preset!r} has no styleid entry")
        params = dict(entries[0].get("params") or {})
        target = {k: entries[0][k] for k in ("layers", "modules") if entries[0].get(k) is not None}
    for key in ("layers", "modules"):
        if overrides.get(key) is not None:
            target = {key: overrides.pop(key)}
        overrides.pop(key, None)
    params.update({k: v for k, v in overrides.items() if v is not None})
    return StyleID(content="self", style="self", **params, **target)


def transfer(pipe, content, style, *, preset: str | None = "styleid", gamma: float | None = None,
             tau: float | None = None, num_inference_steps: int | None = None, layers=None,
             modules: str | None = None, store_dtype=None, offload=None, output_type: str = "pt",
             **call_kwargs) -> StyleTransfer:
    """Style transfer with StyleID on ``pipe``.

    ``content``/``style``: images ``[1, 3, H, W]`` in ``[-1, 1]`` (encoded with the pipeline's VAE) or latents in the
    pipeline's format. ``preset``: ``"styleid"`` (LDM code, default) or
    ``"styleid-diffusers"``; ``gamma``/``tau``/``num_inference_steps`` and the injected ``layers``/``modules``
    override it. The stores keep q (content) and
    k/v (style) of the injected layers only, in ``store_dtype`` (e.g. ``torch.float16``) on ``offload`` (e.g.
    ``"cpu"``). Other keyword arguments go to every pipeline call."""
    import attnkit
    from attnkit.diffusion.inversion import adain, call_pipeline, ddim_invert, encode, output_latents
    from attnkit.diffusion.schedulers import TrimmedScheduler, swapped
    from attnkit.diffusion.store import AttentionStore
    from attnkit.hooks.diffusers import DiffusersAdapter

    method = _method_from(preset, {"gamma": gamma, "tau": tau, "num_inference_steps": num_inference_steps,
                                   "layers": layers, "modules": modules})
    steps = method.num_inference_steps
    layers = _injected_layers(method, DiffusersAdapter(pipe).description)
    z_c = content if _is_latent(content) else encode(pipe, content)
    z_s = style if _is_latent(style) else encode(pipe, style)
    store_c = AttentionStore(tensors=("q",), kinds=("self", "joint"), layers=layers, dtype=store_dtype,
                             offload=offload)
    store_s = AttentionStore(tensors=("k", "v"), kinds=("self", "joint"), layers=layers, dtype=store_dtype,
                             offload=offload)
    inv_c = ddim_invert(pipe, z_c, prompt="", num_inference_steps=steps, convention=method.inversion,
                        record=store_c, **call_kwargs)
    inv_s = ddim_invert(pipe, z_s, prompt="", num_inference_steps=steps, convention=method.inversion,
                        record=store_s, **call_kwargs)
    z_t = _initial_latent(method.adain, inv_c.final, inv_s.final, adain)
    method.set_references(content=store_c, style=store_s)
    method.target.layers = layers
    scheduler = TrimmedScheduler(pipe.scheduler, 1) if method.skip_first_step else pipe.scheduler
    with torch.no_grad(), swapped(pipe, scheduler), attnkit.attach(pipe, method):
        out = call_pipeline(pipe, z_t, "", steps, 1.0, call_kwargs)
    latents = output_latents(out)
    images = None
    if output_type != "latent":
        from attnkit.diffusion.inversion import decode

        images = decode(pipe, latents)
    return StyleTransfer(latents, images, store_c, store_s, inv_c, inv_s, method.injected_calls, z_t)


def _injected_layers(method: StyleID, description) -> list[int]:
    from attnkit.interventions.editing._common import select_layers

    return select_layers(description, method.target.layers, method.target.modules, method.default_layers(description))


def _is_latent(x: torch.Tensor) -> bool:
    """Images are ``[B, 3, H, W]``; anything else is taken as latents in the pipeline's format."""
    return not (x.dim() == 4 and x.shape[1] == 3)


def _initial_latent(mode: str, z_c, z_s, adain_fn):
    """AdaIN of the inverted latents; Flux's packed ``[B, N, 4C]`` latents use the packed channels."""
    if mode == "none":
        return z_c
    packed = z_c.dim() == 3
    if mode == "ldm":  # per channel over (B, H, W), unbiased std, no epsilon
        return adain_fn(z_c, z_s, dims=(0, 1) if packed else (0, 2, 3))
    return adain_fn(z_c, z_s, dims=(1,) if packed else (2, 3), eps=1e-4)  # the port: per sample over (H, W), +1e-4
