"""A-STAR — test-time attention segregation and retention (Agarwal et al., ICCV 2023, arXiv 2306.14544),
METHODS-2.md §9b. **No official code was released: the loss forms below are [unverified] reconstructions** (from
the paper and secondary sources); they are configurable, and results that depend on them must say so.

The machinery is Attend-and-Excite's, as diffusers 0.42 ships it (``StableDiffusionAttendAndExcitePipeline``): at
each step ``i < max_iter_to_alter`` (25 of 50)

1. one **conditional-only** denoiser forward on ``z_t`` with gradients, recording every cross-attention map whose
   query count is ``map_queries`` (16² at 512 px; default a sixteenth of the latent grid), averaged over layers and
   heads → ``A [h, w, T]``;
2. text tokens ``[1:-1]`` (SOT and the last position dropped), ×100, softmax over tokens; every concept token's map
   Gaussian-smoothed (3×3, σ = 0.5, reflect padding — A&E's kernel, whose exponent uses ``(x/2σ)²``);
3. the loss (below), then ``z_t ← z_t − α_i ∇_{z_t} L`` with ``α_i = 20·√(linspace(1, 0.5, N))[i]``;
4. the normal CFG step from the updated latent.

Losses ([unverified] forms), maps normalised as above, concepts ``c``:

* segregation ``L_seg = Σ_{c<c'} Σ_p min(A_c, A_c') / Σ_p (A_c + A_c')`` (soft intersection over union);
* retention ``L_ret = Σ_c (1 − Σ min(A_c, B_c) / Σ (A_c + B_c − min))`` with ``B_c`` the concept's map of the
  **previous** step binarised at ``retention_threshold · max`` (0.5).

A&E's iterative refinement at steps {0, 10, 20} is not part of A-STAR and is not run. While attached, the pipeline's
scheduler steps from the updated latent (A&E updates ``latents`` itself); ``remove()`` restores it.

Example (the loss worked examples of METHODS-2.md §9b):
    >>> import torch
    >>> a1, a2 = torch.tensor([[.6, .2], [.1, .1]]), torch.tensor([[.3, .5], [.1, .1]])
    >>> round(float(segregation_loss([a1, a2])), 4)
    0.35
    >>> prev, now = torch.tensor([[.7, .1], [.1, .1]]), torch.tensor([[.4, .4], [.1, .1]])
    >>> round(float(retention_loss([now], [binarise(prev, 0.5)])), 4)
    0.75
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.editing._common import EditingIntervention, _grid
from attnkit.interventions.steering._denoiser_calls import timestep_of


def step_sizes(num_steps: int, scale_factor: float = 20.0, scale_range=(1.0, 0.5)) -> list[float]:
    """``α_i = scale_factor·√(linspace(a, b, N))[i]`` (A&E's step sizes).

    Example:
        >>> [round(step_sizes(50)[i], 4) for i in (0, 10, 24, 49)]
        [20.0, 18.9521, 17.3793, 14.1421]
    """
    return [scale_factor * math.sqrt(x) for x in np.linspace(scale_range[0], scale_range[1], num_steps)]


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """A&E's smoothing kernel ``[size, size]``: ``exp(−((x − m)/(2σ))²)`` per axis, normalised to sum 1."""
    x = torch.arange(size, dtype=torch.float32)
    mean = (size - 1) / 2
    g = torch.exp(-(((x - mean) / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def smooth(image: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """``[h, w]`` → the same, Gaussian-smoothed with reflect padding."""
    pad = size // 2
    padded = torch.nn.functional.pad(image[None, None], (pad, pad, pad, pad), mode="reflect")
    return torch.nn.functional.conv2d(padded, gaussian_kernel(size, sigma).to(image)[None, None])[0, 0]


def concept_maps(maps: torch.Tensor, indices: list[int], size: int = 3, sigma: float = 0.5) -> list[torch.Tensor]:
    """A&E's processing of averaged maps ``[h, w, T]`` → one smoothed ``[h, w]`` map per token index (positions in
    the prompt's token ids, BOS = 0)."""
    text = torch.softmax(maps[:, :, 1:-1] * 100, dim=-1)  # [h, w, T-2]
    return [smooth(text[:, :, i - 1], size, sigma) for i in indices]


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ min(a, b) / Σ (a + b − min(a, b))``."""
    inter = torch.minimum(a, b).sum()
    return inter / (a + b - torch.minimum(a, b)).sum().clamp_min(1e-12)


def segregation_loss(maps: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_{c<c'} Σ min(A_c, A_c') / Σ (A_c + A_c')`` [unverified form]."""
    total = maps[0].new_zeros(())
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            total = total + torch.minimum(maps[i], maps[j]).sum() / (maps[i] + maps[j]).sum().clamp_min(1e-12)
    return total


def binarise(image: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``[image ≥ threshold·max]`` as float."""
    return (image >= threshold * image.max()).float()


def retention_loss(maps: list[torch.Tensor], previous: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_c (1 − soft IoU(A_c, B_c))`` with the previous step's binarised maps ``B_c`` [unverified form]."""
    total = maps[0].new_zeros(())
    for a, b in zip(maps, previous):
        total = total + (1 - soft_iou(a, b.to(a)))
    return total


@register_intervention
class AStar(EditingIntervention, Intervention):
    name = "a-star"
    description = "A-STAR: latent gradient steps that segregate concept attention and retain it across steps " \
                  "(loss forms unverified: no official code)"
    requires = frozenset({"denoiser", "pipeline", "cross_attention"})
    conformance = {
        "neutral": {"token_indices": [1, 2], "max_iter_to_alter": 0},
        "active": {"token_indices": [1, 2], "max_iter_to_alter": 25, "map_queries": 64},
        "families": ("sd-pipeline",), "families_reason": "runs the pipeline's own UNet with its text embeddings",
        "not_applicable": {"batched": "a pipeline call is one batch"}}

    def __init__(self, token_indices: list | None = None, max_iter_to_alter: int = 25, scale_factor: float = 20.0,
                 scale_range: list | tuple = (1.0, 0.5), segregation: bool = True, retention: bool = True,
                 retention_threshold: float = 0.5, map_queries: int | None = None, smooth_size: int = 3,
                 smooth_sigma: float = 0.5, num_steps: int | None = None, cfg: bool | None = None, **target):
        if token_indices is not None and len(token_indices) < 1:
            raise ValueError("a-star: token_indices needs at least one concept token position")
        super().__init__(**target)
        self._init_editing(num_steps, cfg)
        self.token_indices = None if token_indices is None else [int(i) for i in token_indices]
        self.max_iter_to_alter, self.scale_factor = int(max_iter_to_alter), float(scale_factor)
        self.scale_range = tuple(float(x) for x in scale_range)
        self.segregation, self.retention = bool(segregation), bool(retention)
        self.retention_threshold, self.map_queries = float(retention_threshold), map_queries
        self.smooth_size, self.smooth_sigma = int(smooth_size), float(smooth_sigma)
        self.losses: list[dict] = []  # per altered step: step, segregation, retention, total
        self._recording: list | None = None
        self._previous: list | None = None
        self._updated: torch.Tensor | None = None
        self._inner = False

    def setup(self, model) -> None:
        if not self.token_indices:
            raise ValueError("a-star needs token_indices= (the concept tokens' positions in the prompt, BOS = 0)")
        super().setup(model)

    def default_layers(self, description) -> list[int]:
        component = description.component()
        return [i for i, kind in enumerate(component.kinds) if kind == "cross"]

    def install(self, handle) -> list:
        from attnkit.interventions.steering._denoiser_calls import denoisers_of

        hooks = super().install(handle)
        self._handle, self._previous, self._updated = handle, None, None
        self._pipe = handle.description.extra.get("pipeline")
        hooks += [handle.hook(d, self._pre, pre=True, with_kwargs=True) for d in denoisers_of(handle.model)]
        if self._pipe is not None:
            hooks.append(_SchedulerSwap(self._pipe, self))
        return hooks

    # ---- recording ----------------------------------------------------------------------------------------------
    def edit_probs(self, probs, ctx):
        """During the gradient pass, keep the cross-attention maps of ``map_queries`` queries (with their graph)."""
        if self._recording is not None and ctx.q_len == self._queries():
            self._recording.append(probs)  # [1, H, Q, T]
        return probs

    def _queries(self) -> int:
        if self.map_queries is not None:
            return int(self.map_queries)
        info = self.call
        return max(1, (info.height or 64) * (info.width or 64) // 16) if info is not None else 256

    # ---- the latent update ----------------------------------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        info = self.call
        if self._inner or info is None:
            return None
        if info.step == 0:  # a new sampling run: no previous maps to retain
            self._previous, self._updated = None, None
        if info.step >= self.max_iter_to_alter:
            return None
        sample = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("sample")
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if sample is None or text is None:
            return None
        n = info.per_group
        latents, cond_text = sample[-n:], text[-n:]  # the conditional group
        t = timestep_of(args, kwargs)
        updated = self._update(module, latents.detach(), torch.as_tensor(t), cond_text.detach(), info)
        self._updated = updated
        new_sample = updated.repeat(info.groups, *([1] * (updated.dim() - 1)))
        if args and isinstance(args[0], torch.Tensor):
            return (new_sample,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "sample": new_sample}

    def _update(self, module, latents, t, text, info):
        saved = self._calls.info
        sizes = step_sizes(info.num_steps, self.scale_factor, self.scale_range)
        new = []
        for b in range(latents.shape[0]):  # A&E updates each prompt's latent on its own
            z = latents[b:b + 1].clone().requires_grad_(True)
            self._recording, self._inner = [], True
            try:
                with torch.enable_grad():
                    module(z, t, encoder_hidden_states=text[b:b + 1])
                    loss, parts = self._loss(self._recording, info)
                    grad = torch.autograd.grad(loss, z, allow_unused=True)[0] if loss.requires_grad else None
            finally:
                self._recording, self._inner = None, False
                self._calls.info = saved
            step = sizes[min(info.step, len(sizes) - 1)]
            new.append((z - step * grad).detach() if grad is not None else z.detach())
            self.losses.append({"step": info.step, "sample": b, **parts})
        return torch.cat(new)

    def _loss(self, recorded: list, info):
        if not recorded:
            raise ValueError(f"a-star: no cross-attention layer has {self._queries()} queries; set map_queries= to "
                             "one of this model's cross-attention sizes")
        q = recorded[0].shape[2]
        maps = torch.cat([p[0] for p in recorded]).mean(0)  # [Q, T]: layers and heads averaged
        h, w = _grid(info, q) or (int(math.isqrt(q)), q // int(math.isqrt(q)))
        concepts = concept_maps(maps.view(h, w, -1), self.token_indices, self.smooth_size, self.smooth_sigma)
        seg = segregation_loss(concepts) if self.segregation and len(concepts) > 1 else maps.new_zeros(())
        ret = maps.new_zeros(())
        if self.retention and self._previous is not None:
            ret = retention_loss(concepts, self._previous)
        self._previous = [binarise(c.detach(), self.retention_threshold) for c in concepts]
        total = seg + ret
        return total, {"segregation": float(seg.detach()), "retention": float(ret.detach()),
                       "total": float(total.detach())}

    def take_updated(self, sample: torch.Tensor) -> torch.Tensor:
        """The latent the last update produced (used by :func:`generate`'s scheduler), else ``sample``."""
        updated, self._updated = self._updated, None
        return sample if updated is None or updated.shape != sample.shape else updated.to(sample)


class _StepFromUpdated:
    """The pipeline's scheduler stepping from A-STAR's updated latent (A&E updates ``latents`` before the step)."""

    def __init__(self, base, method: AStar):
        self.__dict__.update(base=base, method=method)

    def __getattr__(self, name):
        if name in ("base", "method") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __deepcopy__(self, memo):
        """A deep copy of an attached pipeline gets its stock scheduler."""
        import copy

        return copy.deepcopy(self.base, memo)

    def __setattr__(self, name, value):
        setattr(self.base, name, value)

    def step(self, model_output, timestep, sample, *args, **kwargs):
        return self.base.step(model_output, timestep, self.method.take_updated(sample), *args, **kwargs)


class _SchedulerSwap:
    """Puts :class:`_StepFromUpdated` in the pipeline's ``scheduler`` slot while attached; ``remove()`` restores it
    (the pipeline's config is untouched)."""

    def __init__(self, pipe, method: AStar):
        self.pipe, self.original = pipe, pipe.__dict__.get("scheduler", getattr(pipe, "scheduler", None))
        pipe.__dict__["scheduler"] = _StepFromUpdated(self.original, method)

    def remove(self) -> None:
        if isinstance(self.pipe.__dict__.get("scheduler"), _StepFromUpdated):
            self.pipe.__dict__["scheduler"] = self.original


@dataclass
class AStarResult:
    images: torch.Tensor
    losses: list


def generate(pipe, prompt: str, token_indices: list[int], *, method: AStar | None = None, **call_kwargs) -> AStarResult:
    """Generate ``prompt`` with A-STAR on the concept tokens ``token_indices`` (positions in the prompt's token
    ids, BOS = 0). Other keyword arguments go to the pipeline call (``num_inference_steps``, ``generator`` …)."""
    import attnkit

    method = method or AStar(token_indices=token_indices)
    method.token_indices = list(token_indices)
    with attnkit.attach(pipe, method):  # attaching also makes the scheduler step from the updated latent
        out = pipe(prompt, **call_kwargs)
    return AStarResult(out.images, method.losses)
