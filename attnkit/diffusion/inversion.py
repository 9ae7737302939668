"""DDIM inversion of an image or a video with a given diffusers pipeline, and the helpers around it.

:func:`ddim_invert` runs the pipeline itself with its scheduler wrapped by
:class:`~attnkit.diffusion.schedulers.InverseScheduler`, so prompt encoding, classifier-free guidance and every
family-specific denoiser argument stay the pipeline's own: it works for every pipeline that takes ``latents=``
(StableDiffusion/XL, SD3, Flux, PixArt, AnimateDiff, CogVideoX; not the class-conditional ``DiTPipeline``, which
has no ``latents`` argument). It is deterministic (no random draw) and returns the whole latent trajectory.
An :class:`~attnkit.diffusion.store.AttentionStore` passed as ``record=`` is attached during the pass and keeps the
chosen q/k/v/maps under the timestep each denoiser call used.

Latents are in the pipeline's own ``latents=`` format: ``[B, C, h, w]`` (images), ``[B, C, F, h, w]``
(AnimateDiff), ``[B, F, C, h, w]`` (CogVideoX), packed ``[B, h·w/4, 4C]`` (Flux). :func:`encode` and
:func:`decode` convert images / videos (``[-1, 1]``, ``[B, 3, H, W]`` or ``[B, F, 3, H, W]``) with the pipeline's VAE.

Example (a tiny SD pipeline: invert, then sample back with the stock pipeline from the inverted latent):
    >>> import torch
    >>> from attnkit.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sd")
    >>> x0 = encode(pipe, torch.rand(1, 3, 8, 8) * 2 - 1)   # the tiny VAE keeps the size: latents [1, 4, 8, 8]
    >>> inv = ddim_invert(pipe, x0, prompt="", num_inference_steps=10)
    >>> len(inv.latents), inv.timesteps[:3]
    (11, [1, 11, 21])
    >>> back = reconstruct(pipe, inv)
    >>> back.shape == x0.shape
    True
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from attnkit.diffusion.schedulers import InverseScheduler, swapped


@dataclass
class Inversion:
    """The result of :func:`ddim_invert`.

    ``latents[0]`` is the clean latent and ``latents[i]`` the latent after inversion step ``i`` (so ``latents[-1]``
    is the noisy latent sampling starts from); ``timesteps[i]`` is the timestep the denoiser was called with at
    step ``i + 1`` (ascending). ``latent_at(t)`` is the latent the sampling loop should see at timestep ``t``."""

    latents: list
    timesteps: list
    convention: str
    num_inference_steps: int
    call_kwargs: dict = field(default_factory=dict)

    @property
    def final(self) -> torch.Tensor:
        """The inverted (noisy) latent: sampling starts from it."""
        return self.latents[-1]

    def latent_at(self, t) -> torch.Tensor:
        """The inversion latent at the level of sampling timestep ``t`` (Convention A: stored after the step that
        called the denoiser with ``t``)."""
        key = _key(t)
        for i, s in enumerate(self.timesteps):
            if _key(s) == key:
                return self.latents[i + 1]
        raise KeyError(f"timestep {t} is not one of this inversion's {self.timesteps}")


def _key(t) -> float:
    return round(float(t), 3)


def _call_params(pipe) -> set:
    return set(inspect.signature(type(pipe).__call__).parameters)


def pipeline_kind(pipe) -> str:
    """``"flux"``, ``"animatediff"``, ``"cogvideox"`` or ``"image"`` (latents ``[B, C, h, w]``)."""
    name = type(pipe).__name__
    if "Flux" in name:
        return "flux"
    if "CogVideoX" in name:
        return "cogvideox"
    if "AnimateDiff" in name:
        return "animatediff"
    return "image"


def geometry(pipe, latents: torch.Tensor) -> dict:
    """``height``/``width``/``num_frames`` a pipeline call needs for ``latents`` of its own format (Flux: packed
    latents of a square image).

    Example:
        >>> from attnkit.testing import tiny_pipeline
        >>> geometry(tiny_pipeline("sd"), torch.zeros(1, 4, 8, 8))
        {'height': 8, 'width': 8}
    """
    kind = pipeline_kind(pipe)
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8))
    if kind == "flux":
        side = int(round((latents.shape[1]) ** 0.5)) * 2  # packed 2x2 patches
        return {"height": side * spatial, "width": side * spatial}
    if kind == "cogvideox":  # [B, F, C, h, w]
        temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
        return {"num_frames": (latents.shape[1] - 1) * temporal + 1, "height": latents.shape[-2] * spatial,
                "width": latents.shape[-1] * spatial}
    if kind == "animatediff":  # [B, C, F, h, w]
        return {"num_frames": latents.shape[2], "height": latents.shape[-2] * spatial,
                "width": latents.shape[-1] * spatial}
    return {"height": latents.shape[-2] * spatial, "width": latents.shape[-1] * spatial}


def call_pipeline(pipe, latents, prompt, num_inference_steps: int, guidance_scale: float, extra: dict | None = None,
                  output_type: str = "latent"):
    """Run ``pipe`` from ``latents`` with the geometry they imply (height, width, frames), a text length that fits
    the pipeline's tokenizer, ``prompt`` repeated over the batch, and ``extra`` keyword arguments → its output."""
    extra = dict(extra or {})
    params = _call_params(pipe)
    kwargs = {k: v for k, v in geometry(pipe, latents).items() if k in params}
    kwargs.update(extra)
    batch = latents.shape[0]
    if isinstance(prompt, str) and batch > 1 and "prompt_embeds" not in extra:
        prompt = [prompt] * batch
    if "max_sequence_length" in params and "max_sequence_length" not in kwargs:
        tokenizer = getattr(pipe, "tokenizer_2", None) or getattr(pipe, "tokenizer", None)
        limit = getattr(tokenizer, "model_max_length", None)
        if limit is not None and limit < 512:  # tiny / custom tokenizers: the pipeline's default may exceed them
            kwargs["max_sequence_length"] = int(limit)
    if prompt is not None and "prompt_embeds" not in extra:
        kwargs["prompt"] = prompt
    return pipe(latents=latents, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                output_type=output_type, **kwargs)


def ddim_invert(pipe, latents: torch.Tensor, prompt="", *, num_inference_steps: int = 50,
                guidance_scale: float = 1.0, convention: str = "A", record=None, v_prediction: str = "exact",
                **call_kwargs) -> Inversion:
    """Invert ``latents`` (the pipeline's ``latents=`` format) with ``pipe``: deterministic, η = 0.

    ``prompt`` and ``guidance_scale`` are the pipeline's (StyleID: ``""`` and no CFG; FateZero: the source prompt,
    no CFG; MasaCtrl: ``""`` with 7.5). ``convention`` ``"A"`` (destination timestep, diffusers
    ``DDIMInverseScheduler``) or ``"B"`` (source timestep, StyleID's LDM code); flow-matching pipelines use the
    reversed Euler step; v-prediction models the exact inverse of the sampler (``v_prediction="diffusers"``:
    ``DDIMInverseScheduler``'s formula). ``record``: an :class:`~attnkit.diffusion.store.AttentionStore` (or a list of
    interventions) attached during the pass. Other keyword arguments go to the pipeline call.

    Example:
        >>> from attnkit.testing import tiny_pipeline
        >>> pipe = tiny_pipeline("sd")
        >>> a = ddim_invert(pipe, torch.ones(1, 4, 8, 8), num_inference_steps=4)
        >>> b = ddim_invert(pipe, torch.ones(1, 4, 8, 8), num_inference_steps=4)
        >>> torch.equal(a.final, b.final)     # deterministic
        True
    """
    import attnkit

    inverse = InverseScheduler(pipe.scheduler, convention=convention, v_prediction=v_prediction)
    records = [] if record is None else (list(record) if isinstance(record, (list, tuple)) else [record])
    with torch.no_grad(), swapped(pipe, inverse):
        if records:
            with attnkit.attach(pipe, records):
                call_pipeline(pipe, latents, prompt, num_inference_steps, guidance_scale, call_kwargs)
        else:
            call_pipeline(pipe, latents, prompt, num_inference_steps, guidance_scale, call_kwargs)
    if len(inverse.trajectory) != len(inverse.called) + 1 or not inverse.called:
        raise RuntimeError(f"{type(pipe).__name__} did not step the scheduler once per timestep; DDIM inversion "
                           "needs a pipeline that loops over scheduler.timesteps and accepts latents=")
    timesteps = [int(t) if float(t).is_integer() else float(t) for t in inverse.called]
    return Inversion(latents=inverse.trajectory, timesteps=timesteps, convention=convention,
                     num_inference_steps=num_inference_steps,
                     call_kwargs=dict(prompt=prompt, guidance_scale=guidance_scale, **call_kwargs))


def reconstruct(pipe, inversion: Inversion, prompt=None, guidance_scale=None, **call_kwargs) -> torch.Tensor:
    """Sample back from ``inversion.final`` with the stock pipeline (same steps, prompt and guidance unless given)
    → the reconstructed clean latent, in the pipeline's latent format."""
    kwargs = dict(inversion.call_kwargs)
    prompt = kwargs.pop("prompt") if prompt is None else prompt
    scale = kwargs.pop("guidance_scale")
    kwargs.update(call_kwargs)
    with torch.no_grad():
        out = call_pipeline(pipe, inversion.final, prompt, inversion.num_inference_steps,
                            scale if guidance_scale is None else guidance_scale, kwargs)
    return output_latents(out)


def output_latents(out) -> torch.Tensor:
    """The latents a pipeline returned with ``output_type="latent"`` (``.images`` or ``.frames``)."""
    for name in ("images", "frames"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` (Frobenius), the reconstruction error attnkit states and tests."""
    return float((x.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))


# ---- VAE ------------------------------------------------------------------------------------------------------------
def _vae_factors(vae) -> tuple[float, float]:
    config = vae.config
    shift = getattr(config, "shift_factor", None) or 0.0
    return float(config.scaling_factor), float(shift)


def encode(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` or videos ``[B, F, 3, H, W]`` in ``[-1, 1]`` → latents in the pipeline's format,
    using the VAE posterior **mean** (deterministic).

    Example:
        >>> from attnkit.testing import tiny_pipeline
        >>> encode(tiny_pipeline("animatediff"), torch.zeros(1, 4, 3, 8, 8)).shape   # [B, C, F, h, w]
        torch.Size([1, 4, 4, 8, 8])
    """
    vae, kind = pipe.vae, pipeline_kind(pipe)
    scale, shift = _vae_factors(vae)
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        if kind == "cogvideox":  # [B, F, 3, H, W] → VAE [B, 3, F, H, W] → [B, F', C, h, w]
            z = vae.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist.mean
            return (z * scale).permute(0, 2, 1, 3, 4)
        if pixels.dim() == 5:  # per-frame image VAE (AnimateDiff): [B, F, 3, H, W] → [B, C, F, h, w]
            b, f = pixels.shape[:2]
            z = vae.encode(pixels.flatten(0, 1)).latent_dist.mean  # [B·F, C, h, w]
            return ((z - shift) * scale).unflatten(0, (b, f)).permute(0, 2, 1, 3, 4)
        z = (vae.encode(pixels).latent_dist.mean - shift) * scale  # [B, C, h, w]
        if kind == "flux":
            return pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])
        return z


def decode(pipe, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Latents in the pipeline's format → images ``[B, 3, H, W]`` or videos ``[B, F, 3, H, W]`` in ``[0, 1]``."""
    vae, kind = pipe.vae, pipeline_kind(pipe)
    scale, shift = _vae_factors(vae)
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        if kind == "cogvideox":
            video = vae.decode(latents.permute(0, 2, 1, 3, 4) / scale).sample  # [B, 3, F, H, W]
            return ((video.permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)
        if kind == "animatediff":
            b, _, f = latents.shape[:3]
            frames = vae.decode(latents.permute(0, 2, 1, 3, 4).flatten(0, 1) / scale + shift).sample
            return ((frames.unflatten(0, (b, f)) + 1) / 2).clamp(0, 1)
        if kind == "flux":
            geo = geometry(pipe, latents)
            latents = pipe._unpack_latents(latents, height or geo["height"], width or geo["width"],
                                           pipe.vae_scale_factor)
        image = vae.decode(latents / scale + shift).sample
        return ((image + 1) / 2).clamp(0, 1)


def adain(content: torch.Tensor, style: torch.Tensor, dims=(0, 2, 3), eps: float = 0.0,
          unbiased: bool = True) -> torch.Tensor:
    """Adaptive instance normalisation ``σ_s (z_c − μ_c)/σ_c + μ_s`` with statistics over ``dims`` (StyleID's LDM
    code: per channel over ``(B, H, W)``, unbiased std, no epsilon; its diffusers port: ``dims=(2, 3)``,
    ``eps=1e-4`` added to the std).

    Example (METHODS-2.md §5.1):
        >>> c = torch.tensor([0.0, 1, 2, 5]).view(1, 1, 1, 4); s = torch.tensor([2.0, 2, 4, 4]).view(1, 1, 1, 4)
        >>> [round(v, 6) for v in adain(c, s).flatten().tolist()]
        [1.930955, 2.465477, 3.0, 4.603568]
    """
    mu_c, mu_s = content.mean(dims, keepdim=True), style.mean(dims, keepdim=True)
    sd_c = content.std(dims, keepdim=True, unbiased=unbiased) + eps
    sd_s = style.std(dims, keepdim=True, unbiased=unbiased) + eps
    return sd_s * (content - mu_c) / sd_c + mu_s
