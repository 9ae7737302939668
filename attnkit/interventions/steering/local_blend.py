"""Prompt-to-Prompt's LocalBlend (Hertz et al., 2022; METHODS.md §2.4): keep each target image equal to the source
outside the region its blend words attend to, by blending the latents after every scheduler step.

Rule (the official notebook's ``LocalBlend``):

1. *Maps.* The conditional cross-attention maps of every prompt (source and targets, after the edit) are summed over
   the steps so far, over the heads and over the chosen layers; a 0/1 mask of each prompt's own blend words picks the
   token columns → one map ``[P, h, w]`` (SD-1.x at 512 px: the five 16×16 down/up cross-attention layers).
2. *Mask.* 3×3 max-pool (stride 1, pad 1) → nearest upsampling to the latent size → divide by each sample's maximum →
   ``> threshold`` (0.3) → each target's mask is the union of its own and the source's.
3. *Blend.* ``x_t[i] ← x_t[0] + mask_i · (x_t[i] − x_t[0])`` for every target i; the source is unchanged.

The map sums are scale-free under step 2's normalisation, so summing (the reference's ``attention_store``) and
averaging give the same mask. The reference's ``mask[:1] + mask[1:]`` only broadcasts for one target; here every
target takes the union with the source. Layers: those whose query count is ``(H/4)·(W/4)`` of the latent (SD-1.x's
16×16 at 64×64), outside the UNet mid block, else the coarsest such layers available (tiny test models); on joint
attention (SD3, Flux) every block sees the same token grid, so all of them count.

Example (3×3 maps upsampled to a 6×6 latent: the source attends the top-left corner, the target the bottom-right):
    >>> import torch
    >>> maps = torch.zeros(2, 9); maps[0, 0] = 1.0; maps[1, 8] = 2.0
    >>> mask = blend_mask(maps, (3, 3), (6, 6), threshold=0.3)
    >>> mask[1, 0].int().tolist()[0], mask[1, 0].int().tolist()[5]
    ([1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1])
    >>> x = torch.stack([torch.zeros(1, 6, 6), torch.ones(1, 6, 6)])
    >>> torch.equal(local_blend(x, mask)[1], mask[1])
    True
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F


def grid_of(queries: int, latent_hw: tuple[int, int]) -> tuple[int, int] | None:
    """``(h, w)`` of a layer with ``queries`` tokens over a latent of ``latent_hw``: the latent divided by one integer
    factor; None when no factor fits.

    Example:
        >>> grid_of(256, (64, 64)), grid_of(16, (8, 8)), grid_of(6, (8, 8))
        ((16, 16), (4, 4), None)
    """
    height, width = latent_hw
    factor = round(math.sqrt(height * width / queries)) if queries else 0
    if factor < 1 or height % factor or width % factor or (height // factor) * (width // factor) != queries:
        return None
    return height // factor, width // factor


def blend_mask(maps: torch.Tensor, grid: tuple[int, int], latent_hw: tuple[int, int],
               threshold: float = 0.3) -> torch.Tensor:
    """``[P, 1, H, W]`` float mask from word maps ``[P, h·w]`` (row 0 = source): pool, upsample, normalise,
    threshold; targets take the union with the source (row 0 keeps the source's own mask)."""
    h, w = grid
    m = maps.float().reshape(maps.shape[0], 1, h, w)  # [P, 1, h, w]
    m = F.max_pool2d(m, kernel_size=3, stride=1, padding=1)
    m = F.interpolate(m, size=tuple(latent_hw))  # nearest, as the reference
    m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-30)
    mask = m > threshold  # [P, 1, H, W]
    return torch.cat([mask[:1], mask[1:] | mask[:1]]).float()


def local_blend(latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x[i] ← x[0] + mask_i·(x[i] − x[0])`` for i ≥ 1. latents ``[P, C, H, W]`` (or packed ``[P, H·W, C]`` with a
    mask ``[P, 1, H, W]``), mask ``[P, 1, H, W]`` → same shape as latents."""
    if latents.dim() == 3:  # Flux-style packed tokens: one mask value per token
        m = mask.flatten(2).transpose(1, 2).to(latents)  # [P, H·W, 1]
    else:
        m = mask.to(latents)
    source = latents[:1]
    blended = source + m[1:] * (latents[1:] - source)
    return torch.cat([source, blended])


def latent_grid(latents: torch.Tensor) -> tuple[int, int] | None:
    """Spatial size of pipeline latents: ``[B, C, H, W]`` → (H, W); packed ``[B, N, C]`` → a square grid or None.

    Example:
        >>> latent_grid(torch.zeros(2, 4, 8, 6)), latent_grid(torch.zeros(2, 16, 64)), latent_grid(torch.zeros(2, 12, 64))
        ((8, 6), (4, 4), None)
    """
    if latents.dim() == 4:
        return int(latents.shape[2]), int(latents.shape[3])
    if latents.dim() == 3:
        side = math.isqrt(int(latents.shape[1]))
        return (side, side) if side * side == latents.shape[1] else None
    return None


class SchedulerStepHook:
    """Runs ``fn(prev_sample, timestep) -> prev_sample`` after every ``scheduler.step`` while ``handle`` is active.

    Installed as an instance attribute of the scheduler (``scheduler.step``); ``remove()`` restores the class
    method. A deep copy of the scheduler gets the stock method back."""

    def __init__(self, scheduler, fn, handle):
        self.scheduler, self.fn, self.handle = scheduler, fn, handle
        self.original = scheduler.step
        scheduler.step = self

    def __call__(self, model_output, timestep, sample, *args, **kwargs):
        out = self.original(model_output, timestep, sample, *args, **kwargs)
        if self.handle.removed or not self.handle.active:
            return out
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        new = self.fn(prev, timestep)
        if new is prev:
            return out
        if isinstance(out, tuple):
            return (new,) + tuple(out[1:])
        out.prev_sample = new
        return out

    def remove(self) -> None:
        if self.scheduler.__dict__.get("step") is self:
            del self.scheduler.__dict__["step"]

    def __deepcopy__(self, memo):
        scheduler = memo.get(id(self.scheduler), self.scheduler)
        return types.MethodType(type(scheduler).step, scheduler)
