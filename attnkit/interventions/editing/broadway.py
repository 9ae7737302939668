"""BroadWay / ByTheWay — temporal self-guidance and Fourier motion enhancement (Bu et al., arXiv 2410.06241; repo
Bujiazi/BroadWay, whose only code is a README snippet), METHODS-2.md §6.

In every temporal self-attention module of ``up_blocks.1``, ``.2`` and ``.3`` (AnimateDiff's motion modules; each
spatial location attends across the F frames: maps ``[B·h·w, heads, F, F]``), during the first 20 % of the steps::

    E(A) = mean over (locations, heads, query frames) of Σ_j A_ij²       (conditional half only)
    1. E1 = E(A)
    2. A ← A + α (A_up1 − A)        A_up1: the same motion module / slot of up_blocks.1 in this UNet call,
                                    bilinearly resized to this block's h×w (in up_blocks.1 itself: a no-op)
       E2 = E(A), split by the DFT along the key axis: E2_h on the band F//2 − τ ≤ j ≤ F//2 + τ, E2_l the rest
    3. β = max(β_user, √((E1 − E2_l)/E2_h))   (a NaN β_c falls back to β_user, as Python's max does)
    4. high-band DFT coefficients × β, inverse DFT, real part, negatives → 0, rows renormalised to 1 (both halves)

Energies and β are per video (the code runs one video; per-sample energies keep a batch equal to its videos run
alone); the unconditional rows of a video use its conditional half's β.

Unverified parts of the README snippet stay configurable: the module correspondence (same index and slot), the
interpolation (``interpolation="bilinear"`` or ``"nearest"``), the window rounding (``step < ceil(0.2·N)``). The DC
term is never in the high band (the literal band would contain it with fewer than 2τ + 2 frames). Defaults
(preset ``broadway``): AnimateDiff τ = 7, α = 0.6, β = 1.5; VideoCrafter2's τ = 7, α = 0.1, β = 10 is
``broadway-videocrafter``. Joint spatio-temporal attention (CogVideoX, Wan, LTX) has no per-location F×F map: those
models are refused at attach. The F×F maps are tiny, so the edit runs on the eager path of these modules only.

Example (the worked example of METHODS-2.md §6; the spec prints [0.412207, 0.530528, 0.057236, 0] — its
renormalisation was rounded: 0.439038 / 1.065063 = 0.412218 — and E3 = 0.45468, which these values give):
    >>> import torch
    >>> A = torch.tensor([0.7, 0.1, 0.1, 0.1]).view(1, 1, 1, 4); ref = torch.tensor([0.1, 0.6, 0.2, 0.1]).view(1, 1, 1, 4)
    >>> out, stats = motion_rule(A, ref, alpha=0.6, beta=1.5, tau=1, cond=torch.tensor([True]))
    >>> [round(x, 6) for x in out.flatten().tolist()], round(stats["beta"], 5)
    ([0.412218, 0.530544, 0.057238, 0.0], 2.10042)
"""

from __future__ import annotations

import math
import re

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.editing._common import EditingIntervention, token_grid

_MODULE = re.compile(r"up_blocks\.(\d+)\.(?:motion_modules|temp_attentions)\.(\d+)\..*attn(\d)$")


def energy(probs: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``E(A)``: mean over rows, heads and query frames of ``Σ_j A_ij²``. probs ``[R, H, F, F]``, rows bool ``[R]``."""
    if rows is not None:
        probs = probs[rows]
    return probs.float().pow(2).sum(-1).mean()


def high_band(frames: int, tau: int, device=None) -> torch.Tensor:
    """Bool ``[F]``: DFT indices ``F//2 − τ ≤ j ≤ F//2 + τ``, DC excluded.

    Example:
        >>> high_band(16, 7).nonzero().flatten().tolist() == list(range(1, 16)), high_band(4, 1).tolist()
        (True, [False, True, True, True])
    """
    j = torch.arange(frames, device=device)
    return (j >= frames // 2 - tau) & (j <= frames // 2 + tau) & (j > 0)


def band_energies(probs: torch.Tensor, band: torch.Tensor, rows: torch.Tensor | None = None):
    """``(E_low, E_high)`` by Parseval from the DFT along the key axis (fp32), averaged as :func:`energy`."""
    if rows is not None:
        probs = probs[rows]
    spectrum = torch.fft.fft(probs.float(), dim=-1).abs().pow(2) / probs.shape[-1]  # [R, H, F, F]
    high = (spectrum * band).sum(-1).mean()
    return spectrum.sum(-1).mean() - high, high


def motion_rule(probs, reference, *, alpha: float, beta: float, tau: int, cond):
    """Steps 1–4 of the module docstring on maps ``probs`` ``[R, H, F, F]`` with ``reference`` (same shape; None =
    no guidance) and the conditional rows ``cond`` (bool ``[R]``) → ``(new maps, {"E1", "E2", "beta"})``."""
    e1 = float(energy(probs, cond))
    guided = probs if reference is None else probs + alpha * (reference.to(probs) - probs)
    band = high_band(probs.shape[-1], tau, probs.device)
    e2_low, e2_high = (float(x) for x in band_energies(guided, band, cond))
    beta_c = math.sqrt((e1 - e2_low) / e2_high) if e2_high > 0 and e1 >= e2_low else float("nan")
    beta_used = max(beta, beta_c)  # NaN β_c: Python's max keeps β (as the README snippet does)
    spectrum = torch.fft.fft(guided.float(), dim=-1)
    spectrum = torch.where(band, spectrum * beta_used, spectrum)
    enhanced = torch.fft.ifft(spectrum, dim=-1).real.clamp_min(0)
    enhanced = enhanced / enhanced.sum(-1, keepdim=True).clamp_min(1e-12)
    return enhanced.to(probs.dtype), {"E1": e1, "E2": e1 if reference is None else float(energy(guided, cond)),
                                      "beta": beta_used}


@register_intervention
class BroadWay(EditingIntervention, Intervention):
    name = "broadway"
    description = "BroadWay: temporal self-guidance from up_blocks.1 and Fourier motion enhancement"
    requires = frozenset({"denoiser", "temporal_attention"})
    conformance = {"neutral": {"alpha": 0.0, "beta": 1.0}, "active": {}}

    def __init__(self, tau: int = 7, alpha: float = 0.6, beta: float = 1.5, window: float = 0.2,
                 blocks=(1, 2, 3), reference_block: int = 1, interpolation: str = "bilinear",
                 num_steps: int | None = None, cfg: bool | None = None, **target):
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"broadway: interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        if not 0.0 <= window <= 1.0:
            raise ValueError(f"broadway: window is a fraction of the steps in [0, 1], got {window}")
        super().__init__(**target)
        self._init_editing(num_steps, cfg)
        self.tau, self.alpha, self.beta, self.window = int(tau), float(alpha), float(beta), float(window)
        self.blocks, self.reference_block = tuple(int(b) for b in blocks), int(reference_block)
        self.interpolation = interpolation
        self.stats: list[dict] = []  # per edited call: module, step, E1, E2, beta
        self._maps: dict = {}
        self._maps_call = -1

    def default_layers(self, description) -> list[int]:
        names = description.component().names
        temporal = set(description.extra.get("temporal_layers", ()))
        layers = [i for i in sorted(temporal) if (m := _MODULE.search(names[i])) and int(m.group(1)) in self.blocks]
        if not layers:
            raise ValueError(f"broadway: no temporal attention in up_blocks {list(self.blocks)} of this model")
        return layers

    def _active(self, info) -> bool:
        return info.step < math.ceil(self.window * info.num_steps)

    def edit_probs(self, probs, ctx):
        """probs ``[B·h·w, H, F, F]`` of one temporal module."""
        info = self.call
        if info is None or not self._active(info):
            return probs
        if self._maps_call != self._calls.calls:  # a new UNet call: forget the previous call's up_blocks.1 maps
            self._maps, self._maps_call = {}, self._calls.calls
        block, index, slot = (int(g) for g in _MODULE.search(self._names[ctx.layer]).groups())
        rows = probs.shape[0]
        n, hw = info.batch, rows // info.batch
        h, w = token_grid(info, hw)
        cond = info.group_of_rows(rows).to(probs.device) == info.groups - 1  # [R]: the conditional half
        if block == self.reference_block:
            self._maps[(index, slot)] = (probs.detach(), h, w)
            reference = None  # A_up1 = A: the guidance is a no-op
        else:
            stored = self._maps.get((index, slot))
            reference = None if stored is None else self._resize(stored, n, h, w)
            if stored is None:
                self._calls.warn(("ref", index, slot), f"broadway: up_blocks.{self.reference_block} has no motion "
                                                       f"module {index} (slot attn{slot}); guidance skipped there")
        sample = info.sample_of_rows(rows).to(probs.device) % info.per_group  # [R]: sample index within its group
        new = probs.clone()
        for s in range(info.per_group):  # each video its own energies (the code's batch of one)
            mine = sample == s
            ref = None if reference is None else reference[mine]
            new[mine], stats = motion_rule(probs[mine], ref, alpha=self.alpha, beta=self.beta, tau=self.tau,
                                           cond=cond[mine])
            self.stats.append({"module": self._names[ctx.layer], "step": info.step, "sample": s, **stats})
        return new

    def _resize(self, stored, n: int, h: int, w: int) -> torch.Tensor:
        """The reference maps ``[n·h1·w1, H, F, F]`` resized over space to ``[n·h·w, H, F, F]``."""
        maps, h1, w1 = stored
        heads, frames = maps.shape[1], maps.shape[-1]
        grid = maps.view(n, h1, w1, heads * frames * frames).permute(0, 3, 1, 2).float()  # [n, HFF, h1, w1]
        kwargs = {"align_corners": False} if self.interpolation == "bilinear" else {}
        grid = torch.nn.functional.interpolate(grid, size=(h, w), mode=self.interpolation, **kwargs)
        return grid.permute(0, 2, 3, 1).reshape(n * h * w, heads, frames, frames)
