"""Helpers shared by the diffusion steering methods (PAG, prompt-to-prompt): reading and growing the batch of one
denoiser call, finding its timestep, and locating the sampling step inside a pipeline's scheduler.

These work on the ``(args, kwargs)`` a ``forward_pre_hook(with_kwargs=True)`` receives, for UNet2DConditionModel
(``sample, timestep, encoder_hidden_states``) and the DiT/SD3/Flux/PixArt transformers (``hidden_states=…``).

Example:
    >>> import torch
    >>> args, kwargs = (torch.zeros(4, 2),), {"timestep": torch.tensor(3), "encoder_hidden_states": torch.ones(4, 5)}
    >>> args, kwargs = append_rows(args, kwargs, batch=4, rows=slice(2, 4))
    >>> args[0].shape[0], kwargs["encoder_hidden_states"].shape[0], kwargs["timestep"].shape
    (6, 6, torch.Size([]))
"""

from __future__ import annotations

import warnings

import torch

#: kwargs that look batched but are not (Flux position ids are ``[tokens, 3]``)
UNBATCHED_KWARGS = ("img_ids", "txt_ids")
SAMPLE_KWARGS = ("sample", "hidden_states")


def denoisers_of(obj) -> list[torch.nn.Module]:
    """The denoiser modules (unet / transformer / …) of a pipeline, or ``[obj]`` for a bare denoiser."""
    from attnkit.hooks.diffusers import _denoisers

    return [module for _, module in _denoisers(obj)]


def pipeline_of(obj):
    """``obj`` if it is a diffusers pipeline, else None (a bare denoiser)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover
        return None
    return obj if isinstance(obj, DiffusionPipeline) else None


def batch_size_of(args, kwargs) -> int | None:
    """Batch size of a denoiser call: the leading dim of its sample / hidden states."""
    sample = args[0] if args and isinstance(args[0], torch.Tensor) else None
    for name in SAMPLE_KWARGS:
        if sample is None and isinstance(kwargs.get(name), torch.Tensor):
            sample = kwargs[name]
    return None if sample is None else int(sample.shape[0])


def timestep_of(args, kwargs) -> float | None:
    """The (first) timestep value of a denoiser call, as a float; None when absent."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else None
    return None if t is None else float(t)


def _grow(x, batch: int, rows: slice, frames: int = 1):
    if isinstance(x, torch.Tensor):
        if x.dim() > 0 and x.shape[0] == batch:
            return torch.cat([x, x[rows]])
        if frames > 1 and x.dim() > 0 and x.shape[0] == batch * frames:  # one row per sample and frame
            per = x.unflatten(0, (batch, frames))  # [B, F, …] (AnimateDiff passes the text once per frame)
            return torch.cat([per, per[rows]]).flatten(0, 1)
        return x
    if isinstance(x, dict):
        return {k: (v if k in UNBATCHED_KWARGS else _grow(v, batch, rows, frames)) for k, v in x.items()}
    if isinstance(x, list):
        return [_grow(v, batch, rows, frames) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_grow(v, batch, rows, frames) for v in x)
    return x


def _frames(args, kwargs) -> int:
    """Frames of a video UNet call (``sample [B, C, F, H, W]``), else 1."""
    sample = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("sample")
    return int(sample.shape[2]) if isinstance(sample, torch.Tensor) and sample.dim() == 5 else 1


def append_rows(args, kwargs, batch: int, rows: slice):
    """Append a copy of batch rows ``rows`` to every batched tensor of a denoiser call (nested dicts/lists too).

    A tensor counts as batched when its leading dim equals ``batch``, or ``batch·F`` for a video UNet call
    (``sample [B, C, F, H, W]``, whose text comes once per frame, as AnimateDiff passes it); scalars and
    ``img_ids``/``txt_ids`` are kept."""
    frames = _frames(args, kwargs)
    new_args = tuple(_grow(a, batch, rows, frames) for a in args)
    new_kwargs = {k: (v if k in UNBATCHED_KWARGS else _grow(v, batch, rows, frames)) for k, v in kwargs.items()}
    return new_args, new_kwargs


def output_sample(output) -> torch.Tensor:
    """The predicted sample of a denoiser output (tuple or ``BaseOutput``)."""
    if isinstance(output, tuple):
        return output[0]
    return output.sample if hasattr(output, "sample") else output[0]


def with_output_sample(output, sample: torch.Tensor):
    """``output`` with its predicted sample replaced (same container type)."""
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample,) + tuple(output[1:])
    output.sample = sample  # diffusers BaseOutput keeps attribute and key in sync
    return output


def scheduler_step(pipe, t: float | None) -> tuple[int, int] | None:
    """``(index, num_steps)`` of timestep ``t`` in ``pipe.scheduler.timesteps``; None if it cannot be located."""
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    if t is None or not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
        return None
    distance = (timesteps.float().cpu() - t).abs()
    index = int(distance.argmin())
    return (index, int(timesteps.numel())) if float(distance[index]) < 1e-3 * max(1.0, abs(t)) else None


class WarnOnce:
    """``warn(key, message)`` emits a RuntimeWarning the first time a key is seen."""

    def __init__(self):
        self.seen: set = set()

    def __call__(self, key, message: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            warnings.warn(f"attnkit: {message}", RuntimeWarning, stacklevel=3)
