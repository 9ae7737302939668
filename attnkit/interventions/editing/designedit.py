"""DesignEdit — key-masking self-attention for object removal (Jia et al., arXiv 2403.14487; repo
design-edit/DesignEdit), METHODS-2.md §9a.

The image is DDIM-inverted (Convention A, conditional only, prompt usually ``""``) and the inverted latent fills a
batch of two: row 0 reconstructs the source, row 1 is the inpainting layer. In **every** self-attention layer at
steps 1–39 of 50, for the **conditional** row 1 only, the keys of the hole ``M`` are masked:

* ``key_mask="zero_hidden"`` (the code's default): the keys are computed from ``(1 − M)·hidden``, i.e.
  ``k' = (1 − M)(k − b) + b`` (``b`` = ``to_k``'s bias; SDXL has none, so hole keys become the zero vector and
  their logit is exactly 0, not −∞). Needs keys without a norm or RoPE (UNets); otherwise use
* ``key_mask="neg_inf"`` (the paper's wording): ``−∞`` on hole keys (``M ≥ 0.5``).

Queries and values keep the original hidden states. ``M`` is the removal mask dilated by ``attend_scale`` pixels
(20 for removal, 30 for zoom/pan), resized (nearest) to the latent grid, binarised, then bilinearly resized to each
layer's grid (fractional edges). :func:`remove` also runs the code's latent fusion after steps 1–41:
``x[1] ← x[1]·M + x[0]·(1 − M)``. Not implemented: the proximal inversion guidance, the refine mask, and the
move/zoom/pan layer pasting.

Example (DesignEdit's worked example: q = [1, 1], keys [1,0], [0,1], [2,2], the third in the hole):
    >>> import torch
    >>> q, k = torch.tensor([1.0, 1.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    >>> hole = torch.tensor([0.0, 0.0, 1.0])
    >>> zeroed = zero_hidden_keys(k, hole[:, None], bias=None)
    >>> [round(p, 4) for p in torch.softmax(zeroed @ q / 2 ** 0.5, 0).tolist()]
    [0.4011, 0.4011, 0.1978]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.diffusion.inject import key_mask_bias
from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.editing._common import (
    EditingIntervention,
    check_steps,
    in_steps,
    spatial_self_layers,
    token_mask,
)

KEY_MASKS = ("zero_hidden", "neg_inf")
_ROPE_PROCESSORS = ("Flux", "CogVideoX", "Wan", "LTX", "HunyuanVideo")


def zero_hidden_keys(k: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Keys of ``(1 − M)·hidden`` from the keys of ``hidden``: ``(1 − M)(k − b) + b`` (``to_k`` is linear).
    k ``[…, K, D]``, mask broadcastable to ``[…, K, 1]``, bias ``[D]`` or None."""
    b = 0.0 if bias is None else bias.to(k)
    return (1 - mask.to(k)) * (k - b) + b


def removal_mask(mask: torch.Tensor, latent_size: tuple[int, int], dilate: int = 20) -> torch.Tensor:
    """The code's mask preparation: ``mask`` ``[H, W]`` (image pixels, 1 = remove) dilated by ``dilate`` pixels with
    a square kernel, resized (nearest) to ``latent_size`` and binarised → ``[h, w]`` float.

    Example:
        >>> m = torch.zeros(8, 8); m[3, 3] = 1
        >>> removal_mask(m, (4, 4), dilate=1).tolist()[1]
        [0.0, 1.0, 1.0, 0.0]
    """
    mask = mask.float()[None, None]
    if dilate > 0:
        mask = torch.nn.functional.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate)
    mask = torch.nn.functional.interpolate(mask, size=tuple(latent_size), mode="nearest")
    return (mask[0, 0] > 0).float()


@register_intervention
class DesignEdit(EditingIntervention, Intervention):
    name = "designedit"
    description = "DesignEdit: mask the hole's keys in the inpainting row's self-attention"
    requires = frozenset({"denoiser"})
    conformance = {
        "neutral": {"mask": [[1.0, 0.0], [0.0, 0.0]], "key_mask": "neg_inf", "steps": [0, 0]},
        "active": {"mask": [[1.0, 0.0], [0.0, 0.0]], "key_mask": "neg_inf", "steps": None},
        "not_applicable": {"batched": "it edits one row of the batch (the inpainting row) by design"}}

    def __init__(self, mask=None, key_mask: str = "zero_hidden", steps=(1, 40), inpaint_row: int = 1,
                 cond_only: bool = True, num_steps: int | None = None, cfg: bool | None = None, **target):
        if key_mask not in KEY_MASKS:
            raise ValueError(f"designedit: key_mask must be one of {KEY_MASKS}, got {key_mask!r}")
        super().__init__(**target)
        self._init_editing(num_steps, cfg)
        self.mask = None if mask is None else torch.as_tensor(mask, dtype=torch.float32)
        self.key_mask, self.inpaint_row, self.cond_only = key_mask, int(inpaint_row), bool(cond_only)
        self.steps = check_steps(None if steps is None else list(steps), "designedit")
        self.edited_calls = 0

    def default_layers(self, description) -> list[int]:
        return spatial_self_layers(description)  # every self-attention layer (down, mid, up)

    def set_mask(self, mask) -> None:
        """The removal mask on the latent grid ``[h, w]`` (see :func:`removal_mask`)."""
        self.mask = torch.as_tensor(mask, dtype=torch.float32)

    def install(self, handle) -> list:
        if self.mask is None:
            raise ValueError("designedit needs mask= (the removal mask on the latent grid, see removal_mask())")
        if self.key_mask == "zero_hidden":
            for site in handle.sites():
                if site.layer in set(self.target.layers or ()) and not _linear_keys(site.module):
                    raise ValueError(f"designedit: key_mask='zero_hidden' needs keys that are a linear function of "
                                     f"the hidden states, but {site.qualname} normalises or rotates them; use "
                                     f"key_mask='neg_inf'")
        return super().install(handle)

    def edit_kv(self, q, k, v, ctx):
        """The inpainting row's hole keys masked. q [B,H,Q,D], k/v [B,H,K,D]."""
        info = self.call
        if info is None or not in_steps(info.step, info.num_steps, self.steps):
            return None
        if info.per_group <= self.inpaint_row:
            self._calls.warn("rows", f"designedit: each guidance group holds {info.per_group} sample(s); the "
                                     f"inpainting row {self.inpaint_row} does not exist")
            return None
        groups = [info.groups - 1] if self.cond_only else None
        rows = info.edited_rows(q.shape[0], [self.inpaint_row], groups).to(q.device)  # [B]
        joint = self._kinds[ctx.layer] == "joint"
        image_k = ctx.key_mask("image")[0] if joint else torch.ones(k.shape[2], dtype=torch.bool, device=k.device)
        hole = token_mask(self.mask, info, int(image_k.sum()), mode="bilinear").to(k.device)  # [n_img] soft edges
        per_key = torch.zeros(k.shape[2], device=k.device)
        per_key[image_k] = hole
        self.edited_calls += 1
        if self.key_mask == "neg_inf":
            return q, k, v, key_mask_bias(per_key[None], rows=rows)
        to_k = getattr(ctx.module, "to_k", None)
        bias = None if to_k is None else getattr(to_k, "bias", None)
        heads, head_dim = k.shape[1], k.shape[3]
        b = None if bias is None else bias.view(heads, 1, head_dim) if bias.numel() == heads * head_dim else None
        masked = zero_hidden_keys(k, per_key[None, None, :, None], b)  # [B, H, K, D]
        return q, torch.where(rows.view(-1, 1, 1, 1), masked, k), v, None


def _linear_keys(module) -> bool:
    """Are the module's keys a linear function of its hidden states (no key norm, no RoPE)?"""
    processor = getattr(module, "processor", None)
    name = type(getattr(processor, "original", processor)).__name__
    return getattr(module, "norm_k", None) is None and not any(p in name for p in _ROPE_PROCESSORS)


# ---- object removal -------------------------------------------------------------------------------------------------
@dataclass
class Removal:
    latents: torch.Tensor  # [2, …]: [reconstruction, inpainted]
    images: torch.Tensor | None
    inversion: object
    edited_calls: int


def remove(pipe, image, mask: torch.Tensor, *, prompt: str = "", num_inference_steps: int = 50,
           guidance_scale: float = 7.5, attend_scale: int = 20, fusion_steps=(1, 42), method: DesignEdit | None = None,
           output_type: str = "pt", **call_kwargs) -> Removal:
    """Remove the object under ``mask`` (``[H, W]`` at image resolution, 1 = remove) from ``image`` (``[1, 3, H, W]``
    in [-1, 1], or latents with ``mask`` on the latent grid and ``attend_scale=0``). Inversion: Convention A,
    conditional only, ``prompt``; sampling ``[reconstruction, inpainting]`` with CFG ``guidance_scale`` and the
    inversion prompt as negative prompt; latent fusion after the steps in ``fusion_steps`` (``[1, 42)`` of 50)."""
    import attnkit
    from attnkit.diffusion.inversion import call_pipeline, ddim_invert, decode, encode, output_latents

    z0 = image if not (image.dim() == 4 and image.shape[1] == 3) else encode(pipe, image)
    packed = z0.dim() == 3  # Flux: [B, h·w/4, 4C] tokens of 2x2 latent patches
    side = int(round(z0.shape[1] ** 0.5)) if packed else None
    grid = (side, side) if packed else tuple(z0.shape[-2:])
    mask_grid = removal_mask(mask, grid, dilate=attend_scale).to(z0)  # [h, w] on the latent (token) grid
    latent_mask = mask_grid.view(1, -1, 1) if packed else mask_grid  # broadcastable to the latents
    inversion = ddim_invert(pipe, z0, prompt=prompt, num_inference_steps=num_inference_steps, guidance_scale=1.0,
                            **call_kwargs)
    method = method or DesignEdit()
    method.set_mask(mask_grid)
    scale = num_inference_steps / 50  # the code's step indices are for 50 steps
    lo, hi = int(fusion_steps[0] * scale), int(fusion_steps[1] * scale)

    def fuse(pipe_, i, t, kwargs):
        x = kwargs["latents"]
        if lo <= i < hi:
            x = x.clone()
            x[1:2] = x[1:2] * latent_mask + x[0:1] * (1 - latent_mask)
        return {"latents": x}

    extra = dict(call_kwargs, callback_on_step_end=fuse, negative_prompt=[prompt, prompt])
    latents = inversion.final.repeat(2, *([1] * (z0.dim() - 1)))
    with torch.no_grad(), attnkit.attach(pipe, method):
        out = call_pipeline(pipe, latents, [prompt, prompt], num_inference_steps, guidance_scale, extra)
    result = output_latents(out)
    images = None if output_type == "latent" else decode(pipe, result)
    return Removal(result, images, inversion, method.edited_calls)
