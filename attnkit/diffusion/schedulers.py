"""Scheduler wrappers that let a stock diffusers pipeline run a DDIM inversion or a shortened sampling loop.

A pipeline loops over ``scheduler.timesteps``, calls its denoiser (with its own prompt encoding, classifier-free
guidance and family-specific arguments) and calls ``scheduler.step``. Wrapping the pipeline's scheduler therefore
turns *any* pipeline that accepts ``latents=`` into an inverter, with no per-family denoiser code:

* :class:`InverseScheduler` — timesteps ascending, ``step`` maps a latent one level up (Convention A or B of DDIM
  inversion for ε/v-prediction schedulers, the reversed Euler step for flow matching). It records the trajectory.
* :class:`TrimmedScheduler` — the base schedule with its first ``skip`` steps removed (StyleID's LDM sampler starts
  at the second timestep with the inverted latent).

Both delegate every other attribute to the wrapped scheduler and are swapped into a pipeline by :func:`swapped`.

Formulas (``ᾱ`` = ``alphas_cumprod``, ``r = T // N``; see METHODS-2.md §5.0):

* Convention A (P2P, MasaCtrl, FateZero, DesignEdit, diffusers ``DDIMInverseScheduler``): the denoiser is called with
  the destination timestep ``τ_i`` on the latent at level ``τ_i − r``; ``ᾱ_src = ᾱ_{τ_i − r}`` (``final_alpha_cumprod``
  below 0), ``ᾱ_dst = ᾱ_{τ_i}``; ``x̂_0 = (x − √(1−ᾱ_src) ε)/√ᾱ_src``, ``x ← √ᾱ_dst x̂_0 + √(1−ᾱ_dst) ε``. This is the exact
  algebraic inverse of ``DDIMScheduler.step`` (η = 0) for the same ε.
* Convention B (StyleID's LDM ``encode_ddim``): called with the source ``t_i`` on the latent at level ``t_i`` (``x_0``
  counts as level ``t_0``), mapped to ``t_{i+1}``; the last target is ``T − 1``.
* v-prediction (CogVideoX): by default the exact algebraic inverse of the sampler's step for the same ``v`` (the
  sampler turns ``v`` into ``x̂_0`` at the destination level): ``x_t = (x_s + b √(1−ᾱ_t) v) / (a + b √ᾱ_t)`` with
  ``a = √((1−ᾱ_s)/(1−ᾱ_t))``, ``b = √ᾱ_s − √ᾱ_t a``. ``v_prediction="diffusers"`` converts ``v`` at the source level
  instead, as diffusers' ``DDIMInverseScheduler`` (and METHODS-2.md §5.0) do.
* Flow matching (SD3, Flux): ``x ← x + (σ_i − σ_src) v`` with ``σ_src`` the next lower sigma of the schedule (0 for the
  first step), the denoiser called at ``σ_i``: the exact inverse of the Euler step for the same ``v``.

Example (the worked example of METHODS-2.md §5.0: ε ≡ 0.5, x_0 = 1, N = 2):
    >>> import torch, diffusers
    >>> base = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    ...                                clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    >>> inv = InverseScheduler(base)
    >>> inv.set_timesteps(2)
    >>> inv.timesteps.tolist()
    [1, 501]
    >>> x = torch.ones(1)
    >>> for t in inv.timesteps:
    ...     x = inv.step(torch.full((1,), 0.5), t, x, return_dict=False)[0]
    >>> [round(float(z), 7) for z in inv.trajectory]
    [1.0, 1.0056409, 0.9427136]
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

CONVENTIONS = ("A", "B")


@dataclass
class StepOutput:
    """What ``scheduler.step`` returns with ``return_dict=True`` (pipelines read ``.prev_sample``)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def __getitem__(self, i):
        return (self.prev_sample, self.pred_original_sample)[i]


def is_flow_matching(scheduler) -> bool:
    """Flow-matching schedulers (SD3, Flux) step in sigma with velocity predictions."""
    return "FlowMatch" in type(scheduler).__name__


class _Wrapper:
    """Delegates attribute reads to the wrapped scheduler ``base``."""

    def __init__(self, base):
        object.__setattr__(self, "base", base)

    def __getattr__(self, name):
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, **kwargs):
        extra = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
        self.base.set_timesteps(num_inference_steps, device=device, **extra, **kwargs)
        self._after_set(device)

    def _after_set(self, device) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def scale_model_input(self, sample, timestep=None, *args, **kwargs):
        scale = getattr(self.base, "scale_model_input", None)
        return sample if scale is None else scale(sample, timestep, *args, **kwargs)


class InverseScheduler(_Wrapper):
    """The pipeline's scheduler run backwards (see the module docstring); ``trajectory`` holds the latent before the
    first step and after every step, in order (``len = N + 1``), and ``called`` the denoiser timesteps.

    ``convention``: ``"A"`` (default) or ``"B"``; ignored for flow matching. ``v_prediction``: ``"exact"`` (default)
    or ``"diffusers"`` (see the module docstring)."""

    def __init__(self, base, convention: str = "A", v_prediction: str = "exact"):
        if convention not in CONVENTIONS:
            raise ValueError(f"DDIM inversion convention must be one of {CONVENTIONS}, got {convention!r}")
        if v_prediction not in ("exact", "diffusers"):
            raise ValueError(f"v_prediction must be 'exact' or 'diffusers', got {v_prediction!r}")
        super().__init__(base)
        object.__setattr__(self, "convention", convention)
        object.__setattr__(self, "v_prediction", v_prediction)
        object.__setattr__(self, "flow", is_flow_matching(base))
        self.__dict__.update(trajectory=[], called=[], timesteps=None, _levels=None)

    def __setattr__(self, name, value):
        if name in ("trajectory", "called", "timesteps", "_levels", "_begin_index", "_step_index"):
            self.__dict__[name] = value
        else:
            setattr(self.base, name, value)

    @property
    def init_noise_sigma(self) -> float:
        return 1.0  # the pipeline's latents are the clean ones: never scale them

    def set_begin_index(self, begin_index: int = 0) -> None:
        self.__dict__["_begin_index"] = begin_index

    def _after_set(self, device) -> None:
        base = self.base
        forward = base.timesteps  # [N] descending (the sampling order)
        self.timesteps = forward.flip(0)  # [N] ascending
        self.trajectory, self.called = [], []
        if self.flow:
            sigmas = base.sigmas.float().cpu()  # [N+1] descending, last = 0 (terminal)
            # level of each ascending step: (source sigma, destination sigma)
            levels = [(float(sigmas[i + 1]), float(sigmas[i])) for i in range(len(forward))][::-1]
        else:
            alphas = base.alphas_cumprod.float().cpu()
            final = float(getattr(base, "final_alpha_cumprod", alphas[0]))
            T, N = int(base.config.num_train_timesteps), len(forward)
            ts = [int(t) for t in self.timesteps]

            def alpha(t: int) -> float:
                return float(alphas[t]) if t >= 0 else final

            if self.convention == "A":
                levels = [(alpha(t - T // N), alpha(t)) for t in ts]
            else:
                targets = ts[1:] + [T - 1]
                levels = [(alpha(t), alpha(nxt)) for t, nxt in zip(ts, targets)]
        self._levels = levels

    def _index(self, timestep) -> int:
        t = float(timestep)
        distance = (self.timesteps.float().cpu() - t).abs()
        index = int(distance.argmin())
        if float(distance[index]) > 1e-3 * max(1.0, abs(t)):
            raise ValueError(f"timestep {t} is not in this inversion's schedule {self.timesteps.tolist()}")
        return index

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        """One inversion step: the latent one level up (see the module docstring)."""
        if self._levels is None:
            raise RuntimeError("call set_timesteps() before step()")
        if not self.trajectory:
            self.trajectory.append(sample.detach().clone())
        index = self._index(timestep)
        src, dst = self._levels[index]
        work = torch.promote_types(sample.dtype, torch.float32)  # at least fp32 (fp64 stays fp64)
        x, out = sample.to(work), model_output.to(work)
        prediction = getattr(self.base.config, "prediction_type", "epsilon")
        if self.flow:
            new, x0 = x + (dst - src) * out, x - src * out  # x̂_0 = x − σ v
        elif prediction == "v_prediction" and self.v_prediction == "exact" and self.convention == "A":
            a = math.sqrt((1 - src) / (1 - dst))
            b = math.sqrt(src) - math.sqrt(dst) * a
            new = (x + b * math.sqrt(1 - dst) * out) / (a + b * math.sqrt(dst))
            x0 = math.sqrt(dst) * new - math.sqrt(1 - dst) * out
        else:
            eps, x0 = _eps_and_x0(x, out, src, prediction)
            new = math.sqrt(dst) * x0 + math.sqrt(1 - dst) * eps
        new = new.to(sample.dtype)
        self.trajectory.append(new.detach().clone())
        self.called.append(float(timestep))
        return StepOutput(new, x0.to(sample.dtype)) if return_dict else (new, x0.to(sample.dtype))


def _eps_and_x0(x, out, alpha: float, prediction: str):
    """``(ε̂, x̂_0)`` of a model output at a level with cumulative alpha ``alpha``."""
    a, b = math.sqrt(alpha), math.sqrt(1 - alpha)
    if prediction == "epsilon":
        return out, (x - b * out) / a
    if prediction == "v_prediction":
        return a * out + b * x, a * x - b * out
    if prediction == "sample":
        return (x - a * out) / b, out
    raise ValueError(f"DDIM inversion does not support prediction_type={prediction!r}")


class TrimmedScheduler(_Wrapper):
    """The wrapped scheduler's own sampling loop without its first ``skip`` steps (the pipeline's latents stand at
    the level of the first remaining timestep). Works for schedulers whose ``step`` derives the previous timestep
    from the current one (DDIM: ``t − T/N``).

    Example:
        >>> import diffusers
        >>> s = TrimmedScheduler(diffusers.DDIMScheduler(steps_offset=1), skip=1)
        >>> s.set_timesteps(50)
        >>> len(s.timesteps), int(s.timesteps[0])
        (49, 961)
    """

    def __init__(self, base, skip: int = 1):
        super().__init__(base)
        object.__setattr__(self, "skip", int(skip))
        self.__dict__["timesteps"] = None

    def __setattr__(self, name, value):
        if name == "timesteps":
            self.__dict__[name] = value
        else:
            setattr(self.base, name, value)

    def _after_set(self, device) -> None:
        if self.skip >= len(self.base.timesteps):
            raise ValueError(f"cannot skip {self.skip} of {len(self.base.timesteps)} steps")
        self.timesteps = self.base.timesteps[self.skip:]

    def step(self, *args, **kwargs):
        return self.base.step(*args, **kwargs)


@contextlib.contextmanager
def swapped(pipe, scheduler):
    """Run ``pipe`` with ``scheduler`` instead of its own inside the block (the pipeline's config is untouched)."""
    original = pipe.__dict__.get("scheduler", getattr(pipe, "scheduler", None))
    pipe.__dict__["scheduler"] = scheduler
    try:
        yield scheduler
    finally:
        pipe.__dict__["scheduler"] = original
