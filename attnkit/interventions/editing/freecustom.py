"""FreeCustom — multi-reference self-attention, MRSA (Ding et al., CVPR 2024; repo aim-uofa/FreeCustom),
METHODS-2.md §5.3.

The batch is ``[target, ref_1, …, ref_R]`` (×2 with classifier-free guidance). In the self-attention of the selected
layers the **target** row's queries attend to its own keys and to every reference's keys::

    K = [K_tgt; K_ref1; …; K_refR]   logits: own keys q·kᵀ/√d;  reference r: q·kᵀ/√d + w_r where M_r = 1, −∞ where 0

(``w_r`` is added to the logit: 3 multiplies the unnormalised probability by e³). Reference rows run normal
self-attention. ``style_fidelity`` f blends the **unconditional** target row only: ``(1 − f)·MRSA + f·SA``; f = 1
(the default) leaves the unconditional branch plain. The masks ``M_r`` (``[h, w]``, e.g. the reference's object
mask) are resized (nearest) to each layer's token grid. Appending runs on the fused path: the key bias joins the
call's mask, no ``[Q, K]`` matrix is built.

:func:`generate` runs the whole method: references re-noised with fresh noise at every step
(``z'_t = √ᾱ_t z'_0 + √(1−ᾱ_t) ε``, no inversion; the scheduler's update of those rows is discarded), their own
captions, one target. Defaults (preset ``freecustom``): SD-1.5, DDIM 50 steps, CFG 7.5, blocks 10–15 (execution
order, as MasaCtrl), every step, weights 3.0. On joint-attention models the references' image keys are appended.
Images only (a video denoiser is refused at attach).

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sd")
    >>> refs = torch.rand(2, 3, 8, 8) * 2 - 1
    >>> out = generate(pipe, "a cat on the grass", refs, masks=[torch.ones(8, 8)] * 2, ref_prompts=["a cat", "grass"],
    ...                num_inference_steps=3, method=FreeCustom(start_layer=3), generator=torch.Generator().manual_seed(0))
    >>> out.images.shape, out.edited_calls > 0
    (torch.Size([1, 3, 8, 8]), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.diffusion.inject import append_kv, reference_bias, resize_token_mask
from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.editing._common import (
    EditingIntervention,
    block_index_layers,
    check_steps,
    in_steps,
    token_grid,
)


@register_intervention
class FreeCustom(EditingIntervention, Intervention):
    name = "freecustom"
    description = "FreeCustom multi-reference self-attention: the target attends to masked reference keys (+w logits)"
    requires = frozenset({"denoiser"})
    conformance = {
        "neutral": {"start_layer": 0, "steps": [0, 0]},
        "active": {"start_layer": 0},
        "not_applicable": {"batched": "by design the target sample attends to the reference samples' keys"}}

    def __init__(self, mask_weights: float | list = 3.0, masks=None, style_fidelity: float = 1.0,
                 start_layer: int = 10, end_layer: int | None = None, steps=None, num_steps: int | None = None,
                 cfg: bool | None = None, **target):
        if not 0.0 <= style_fidelity <= 1.0:
            raise ValueError(f"freecustom: style_fidelity must be in [0, 1], got {style_fidelity}")
        super().__init__(**target)
        self._init_editing(num_steps, cfg)
        self.mask_weights = mask_weights
        self.masks = None if masks is None else [torch.as_tensor(m, dtype=torch.float32) for m in masks]
        self.style_fidelity = float(style_fidelity)
        self.start_layer, self.end_layer = int(start_layer), end_layer
        self.steps = check_steps(steps, "freecustom")
        self.edited_calls = 0

    def setup(self, model) -> None:
        if "video" in model.features:
            raise ValueError("freecustom works on image denoisers only (its references are whole images)")
        super().setup(model)

    def default_layers(self, description) -> list[int]:
        layers = block_index_layers(description, self.start_layer, self.end_layer)
        if not layers:
            n = len(block_index_layers(description, 0))
            raise ValueError(f"freecustom: start_layer {self.start_layer} is past this model's {n} self-attention "
                             f"blocks (choose start_layer < {n}; SD-1.x uses 10)")
        return layers

    def set_masks(self, masks) -> None:
        """One ``[h, w]`` mask per reference, in batch order (None: whole references)."""
        self.masks = None if masks is None else [torch.as_tensor(m, dtype=torch.float32) for m in masks]

    def _weights(self, n_refs: int) -> list[float]:
        w = self.mask_weights
        weights = [float(w)] * n_refs if isinstance(w, (int, float)) else [float(x) for x in w]
        if len(weights) < n_refs:
            raise ValueError(f"freecustom: {n_refs} references but {len(weights)} mask weights")
        return weights[:n_refs]

    def edit_kv(self, q, k, v, ctx):
        """Target rows: own keys plus every reference's (masked, weighted). q [B,H,Q,D], k/v [B,H,K,D]."""
        info = self.call
        if info is None or not in_steps(info.step, info.num_steps, self.steps):
            return None
        n_refs = info.per_group - 1
        if n_refs < 1:
            self._calls.warn("refs", "freecustom: each guidance group holds one sample; the batch must be "
                                     "[target, ref_1, …] per group")
            return None
        rows = q.shape[0]
        groups = [info.groups - 1] if (self.style_fidelity >= 1.0 and info.groups > 1) else None  # cond only
        targets = info.edited_rows(rows, samples=[0], groups=groups).to(q.device)  # [B]
        joint = self._kinds[ctx.layer] == "joint"
        image_k = ctx.key_mask("image")[0] if joint else torch.ones(k.shape[2], dtype=torch.bool, device=k.device)
        n_img = int(image_k.sum())
        h, w = token_grid(info, n_img)
        ref_k, ref_v, ref_b = [], [], []
        for r, weight in enumerate(self._weights(n_refs), start=1):
            src = info.source_rows(rows, r).to(q.device)  # [B]: row of reference r in each row's group
            ref_k.append(k[src][:, :, image_k])
            ref_v.append(v[src][:, :, image_k])
            mask = torch.ones(1, n_img) if self.masks is None else resize_token_mask(self.masks[r - 1], h, w)
            ref_b.append(reference_bias(mask.to(q.device), weight))  # [1, n_img]
        if 0.0 < self.style_fidelity < 1.0 and info.groups > 1:  # plain SA of the uncond targets, blended later
            ctx.state["plain"] = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B,H,Q,D]
            ctx.state["uncond_targets"] = info.edited_rows(rows, samples=[0], groups=[0]).to(q.device)
        k2, v2, bias = append_kv(k, v, torch.cat(ref_k, 2), torch.cat(ref_v, 2), torch.cat(ref_b, 1), rows=targets)
        self.edited_calls += 1
        return q, k2, v2, bias

    def edit_output(self, out, ctx):
        """``style_fidelity`` strictly between 0 and 1: uncond target rows ``(1 − f)·MRSA + f·SA``."""
        plain = ctx.state.pop("plain", None)
        if plain is None:
            return out
        rows = ctx.state.pop("uncond_targets").view(-1, 1, 1, 1)
        f = self.style_fidelity
        return torch.where(rows, (1 - f) * out + f * plain.to(out), out)


# ---- the whole method ---------------------------------------------------------------------------------------------
@dataclass
class FreeCustomResult:
    latents: torch.Tensor  # the target's final latent
    images: torch.Tensor | None
    edited_calls: int


def noise_to(scheduler, clean: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """Forward-noise ``clean`` to timestep ``t`` (``add_noise`` for DDPM-family schedulers, ``scale_noise`` for
    flow matching)."""
    t = torch.as_tensor(t).reshape(1).to(clean.device)
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(clean, noise, t)
    return scheduler.scale_noise(clean, t, noise)


def generate(pipe, prompt: str, references, *, masks=None, ref_prompts=None, num_inference_steps: int = 50,
             guidance_scale: float = 7.5, negative_prompt: str | None = None, generator=None,
             method: FreeCustom | None = None, output_type: str = "pt", **call_kwargs) -> FreeCustomResult:
    """Generate ``prompt`` with ``references`` (images ``[R, 3, H, W]`` in [-1, 1] or latents) as FreeCustom does.

    ``masks``: one ``[h, w]`` mask per reference (None: whole images); ``ref_prompts``: their captions (default
    ``prompt``). ``generator`` draws the target's initial latent and every re-noising (an explicit generator keeps
    other random draws unshifted)."""
    import attnkit
    from attnkit.diffusion.inversion import call_pipeline, decode, encode, output_latents

    refs = references if not (references.dim() == 4 and references.shape[1] == 3) else encode(pipe, references)
    n = refs.shape[0]
    ref_prompts = list(ref_prompts) if ref_prompts is not None else [prompt] * n
    if len(ref_prompts) != n:
        raise ValueError(f"freecustom: {n} references but {len(ref_prompts)} reference prompts")
    method = method or FreeCustom()
    if masks is not None:
        method.set_masks(masks)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps)
    timesteps = list(scheduler.timesteps)

    def fresh(t):
        noise = torch.randn(refs.shape, generator=generator, dtype=refs.dtype).to(refs.device)
        return noise_to(pipe.scheduler, refs, noise, t)

    target = torch.randn((1,) + tuple(refs.shape[1:]), generator=generator, dtype=refs.dtype).to(refs.device)
    latents = torch.cat([target, fresh(timesteps[0])])  # the pipeline scales them by init_noise_sigma (1 here)

    def renoise(pipe_, i, t, kwargs):
        current = kwargs["latents"]
        if i + 1 < len(timesteps):
            current = torch.cat([current[:1], fresh(timesteps[i + 1]).to(current)])
        return {"latents": current}

    extra = dict(call_kwargs, callback_on_step_end=renoise)
    if negative_prompt is not None:
        extra["negative_prompt"] = [negative_prompt] * (n + 1)
    with torch.no_grad(), attnkit.attach(pipe, method):
        out = call_pipeline(pipe, latents, [prompt] + ref_prompts, num_inference_steps, guidance_scale, extra)
    result = output_latents(out)[:1]
    images = None if output_type == "latent" else decode(pipe, result)
    return FreeCustomResult(result, images, method.edited_calls)
