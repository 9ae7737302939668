"""Perturbed-Attention Guidance (PAG; Ahn et al., 2024) for any diffusers pipeline or denoiser.

Each denoiser call gets one extra *perturbed* branch: a copy of the conditional rows in which the chosen
self-attention layers use **identity attention** (every image token attends only to itself, so the attention output
is its value vector). The branches are combined as diffusers' ``StableDiffusionPAGPipeline`` does::

    CFG on   (batch [u, c] → [u, c, p]):  ε = u + w·(c − u) + s·(c − p)
    CFG off  (batch [c]    → [c, p]):     ε = c + s·(c − p)

with ``w`` the pipeline's guidance scale and ``s = max(0, scale − adaptive_scale·(1000 − t))`` when
``adaptive_scale > 0`` (else ``s = scale``). Nothing in the pipeline changes: a forward pre-hook on the denoiser
appends the perturbed rows, and a forward hook folds the 3-way output back into the 2-way ``[u, c']`` the pipeline
expects, with ``c' = c + (s/w)·(c − p)``, so that the pipeline's own ``u + w(c' − u)`` is the formula above
(CFG off: ``c' = c + s·(c − p)``). ``return_branches=True`` skips the fold and returns ``[u, c, p]`` for custom
loops.

Joint attention (SD3, Flux) follows diffusers' ``PAGJointAttnProcessor2_0``: in the perturbed rows the image×image
block of the attention matrix is the identity while image queries still see every text key and text queries attend
normally. In a UNet self-attention layer every key is an image token, so the perturbed output is exactly ``V``.
The identity is an additive key bias (``-inf`` off the diagonal of the image block), so it runs on the fused torch
backend; it is one ``[B, 1, Q, K]`` tensor shared by all heads (the core does not expand it when every head is
targeted), cheap in the default ``"mid"`` layers but N² at high-resolution layers.

Layer selection (``applied_layers``) uses diffusers' patterns: ``re.search`` on the module name, self/joint
attention only (never cross-attention), ``"mid"``/``"down"``/``"up"`` select UNet regions. By default
(``match="strict"``) a pattern ending in a digit must not be followed by another digit, so ``"blocks.1"`` no
longer selects ``blocks.10``–``blocks.19`` (diffusers issue #13594); ``match="diffusers"`` keeps the old behaviour.

Differences from diffusers, by design or not yet handled:
- ``guidance_rescale > 0``: the pipeline rescales with ``c'`` as its reference instead of ``c`` (a warning says so);
- pipelines that run uncond and cond as separate denoiser calls (Flux ``true_cfg_scale``) get PAG on both calls;
- the modular ``PerturbedAttentionGuidance`` guider computes ``p + s(c − p)`` without CFG; we follow the pipeline.

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with attnkit.attach(pipe, PerturbedAttentionGuidance(scale=3.0, applied_layers="mid")) as handle:
    ...     image = pipe("a cat", num_inference_steps=2, guidance_scale=5.0, height=16, width=16,
    ...                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    >>> image.shape, handle.report()["modules"][0]["module"]
    (torch.Size([1, 3, 16, 16]), 'mid_block.attentions.0.transformer_blocks.0.attn1')
"""

from __future__ import annotations

import re

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.steering._denoiser_calls import (
    WarnOnce,
    append_rows,
    batch_size_of,
    denoisers_of,
    output_sample,
    pipeline_of,
    timestep_of,
    with_output_sample,
)
from attnkit.targets import Target, parse_layers

MATCH_MODES = ("strict", "diffusers")
PERTURBABLE_KINDS = ("self", "joint")
_NEG = torch.finfo(torch.float32).min  # finite "-inf": stays 0 when the core multiplies by a head mask


def pattern_regex(pattern: str, match: str = "strict") -> str:
    """The regex used for one ``applied_layers`` pattern.

    Example:
        >>> pattern_regex("blocks.1"), pattern_regex("blocks.1", "diffusers"), pattern_regex("mid")
        ('blocks.1(?!\\\\d)', 'blocks.1', 'mid')
    """
    if match not in MATCH_MODES:
        raise ValueError(f"pag: match must be one of {MATCH_MODES}, got {match!r}")
    return pattern + r"(?!\d)" if match == "strict" and pattern[-1:].isdigit() else pattern


def resolve_pag_layers(names: list[str], kinds: list[str], patterns, match: str = "strict") -> list[int]:
    """Indices of the self/joint attention sites whose qualified name matches any pattern (diffusers rules).

    A pattern that matches nothing raises ``ValueError`` (as diffusers does).

    Example:
        >>> names = [f"transformer_blocks.{i}.attn" for i in range(12)]
        >>> resolve_pag_layers(names, ["joint"] * 12, "blocks.1")
        [1]
        >>> resolve_pag_layers(names, ["joint"] * 12, "blocks.1", match="diffusers")
        [1, 10, 11]
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen: set[int] = set()
    for pattern in patterns:
        regex = re.compile(pattern_regex(pattern, match))
        hits = [i for i, (n, k) in enumerate(zip(names, kinds)) if k in PERTURBABLE_KINDS and regex.search(n)]
        if not hits:
            raise ValueError(f"pag: applied_layers pattern {pattern!r} matches no self-attention module "
                             f"(names look like {names[0]!r})")
        chosen.update(hits)
    return sorted(chosen)


def pag_scale_at(scale: float, adaptive_scale: float, t: float | None) -> float:
    """``s(t) = max(0, scale − adaptive_scale·(1000 − t))`` when adaptive scaling is on, else ``scale``.

    Example:
        >>> pag_scale_at(3.0, 0.005, 900.0), pag_scale_at(3.0, 0.005, 100.0), pag_scale_at(3.0, 0.0, 100.0)
        (2.5, 0.0, 3.0)
    """
    if adaptive_scale > 0 and scale > 0 and t is not None:
        return max(0.0, scale - adaptive_scale * (1000.0 - t))
    return scale


def identity_bias(batch: int, rows: slice, image: torch.Tensor) -> torch.Tensor:
    """Additive bias ``[B, 1, N, N]`` that turns attention in batch ``rows`` into identity on the image block.

    ``image`` is a bool ``[N]`` marking image tokens (queries and keys share positions). Entries image-query ×
    image-key off the diagonal get a huge negative value; everything else (other rows, text queries, image→text) is 0.

    Example:
        >>> b = identity_bias(2, slice(1, 2), torch.tensor([True, True, False]))
        >>> (b[1, 0] < -1e30).int().tolist(), bool((b[0] == 0).all())
        ([[0, 1, 0], [1, 0, 0], [0, 0, 0]], True)
    """
    n = image.shape[0]
    off_diagonal = image[:, None] & image[None, :] & ~torch.eye(n, dtype=torch.bool, device=image.device)  # [N, N]
    bias = torch.zeros(batch, 1, n, n, device=image.device)  # [B, 1, N, N]
    bias[rows, 0] = torch.where(off_diagonal, _NEG, 0.0)
    return bias


def fold_guidance(cond: torch.Tensor, perturbed: torch.Tensor, pag_scale: float, cfg_scale: float) -> torch.Tensor:
    """``c' = c + (s/w)(c − p)``: the conditional prediction that makes ``u + w(c' − u)`` equal PAG+CFG.
    With CFG off pass ``cfg_scale=1``: ``c' = c + s(c − p)``.

    Example:
        >>> u, c, p = torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.5)
        >>> c2 = fold_guidance(c, p, 3.0, 5.0)
        >>> float(u + 5.0 * (c2 - u)), float(u + 5.0 * (c - u) + 3.0 * (c - p))
        (6.5, 6.5)
    """
    return cond + (pag_scale / cfg_scale) * (cond - perturbed)


@register_intervention
class PerturbedAttentionGuidance(Intervention):
    name = "pag"
    conformance = {"neutral": {"scale": 0.0, "applied_layers": None}, "active": {"scale": 3.0, "applied_layers": None}}
    requires = frozenset({"denoiser"})
    description = "Perturbed-attention guidance: identity self-attention in a perturbed branch, combined with CFG"

    def __init__(self, scale: float = 3.0, adaptive_scale: float = 0.0, applied_layers: str | list | None = "mid",
                 guidance_scale: float | None = None, cfg: bool | None = None, match: str = "strict",
                 return_branches: bool = False, **target):
        if scale < 0 or adaptive_scale < 0:
            raise ValueError(f"pag: scale and adaptive_scale must be ≥ 0, got {scale}, {adaptive_scale}")
        if match not in MATCH_MODES:
            raise ValueError(f"pag: match must be one of {MATCH_MODES}, got {match!r}")
        if guidance_scale is not None and guidance_scale <= 0:
            raise ValueError(f"pag: guidance_scale must be > 0, got {guidance_scale}")
        super().__init__(**target)
        self.scale, self.adaptive_scale, self.applied_layers = float(scale), float(adaptive_scale), applied_layers
        self.guidance_scale, self.cfg, self.match, self.return_branches = guidance_scale, cfg, match, return_branches
        self._branch: dict | None = None  # the current denoiser call's layout, set by the pre-hook
        self._handle = None
        self._pipe = None
        self._warn = WarnOnce()

    # ---- planning -------------------------------------------------------------------------------------------------
    def setup(self, model) -> None:
        """Restrict the target to self/joint layers matching ``applied_layers`` (and any explicit ``layers=``)."""
        component = model.component(self.component)
        names, kinds = component.names, component.kinds
        if self.applied_layers is None:
            layers = [i for i, k in enumerate(kinds) if k in PERTURBABLE_KINDS]
        else:
            layers = resolve_pag_layers(names, kinds, self.applied_layers, self.match)
        if self.target.layers is not None:
            explicit = set(parse_layers(self.target.layers, len(names)))
            layers = [i for i in layers if i in explicit]
        self.resolved_layers = [names[i] for i in layers]
        self.target = Target(layers=layers or [], heads=self.target.heads, modules=self.target.modules)

    def install(self, handle) -> list:
        self._handle, self._pipe = handle, pipeline_of(handle.model)
        hooks = []
        for denoiser in denoisers_of(handle.model):
            hooks.append(handle.hook(denoiser, self._add_branch, pre=True, with_kwargs=True))
            hooks.append(handle.hook(denoiser, self._fold_branch, with_kwargs=True))
        return hooks

    # ---- guidance settings for one call -------------------------------------------------------------------------
    def _cfg(self) -> tuple[bool, float]:
        """(CFG on?, w) for the current call: explicit settings first, then the pipeline's own."""
        pipe = self._pipe
        cfg = self.cfg
        if cfg is None and pipe is not None:
            try:
                cfg = bool(pipe.do_classifier_free_guidance)
            except AttributeError:  # no such property, or read outside the pipeline's __call__
                cfg = False
        if cfg is None:
            cfg = self.guidance_scale is not None and self.guidance_scale > 1
        w = self.guidance_scale
        if w is None and pipe is not None:
            w = getattr(pipe, "_guidance_scale", None)
        if cfg and w is None:
            raise ValueError("pag: CFG is on but the guidance scale is unknown; pass guidance_scale=")
        if cfg and pipe is not None and float(getattr(pipe, "_guidance_rescale", 0.0) or 0.0) > 0:
            self._warn("rescale", "pag: guidance_rescale > 0 uses c' = c + (s/w)(c − p) as its reference, "
                                  "diffusers' PAG pipeline uses c; outputs differ slightly")
        return bool(cfg), float(w) if cfg else 1.0

    # ---- denoiser hooks -------------------------------------------------------------------------------------------
    def _add_branch(self, module, args, kwargs):
        """Forward pre-hook: append a copy of the conditional rows (the perturbed branch)."""
        self._branch = None
        handle = self._handle
        if handle is None or not handle.active:
            return None
        batch = batch_size_of(args, kwargs)
        s = pag_scale_at(self.scale, self.adaptive_scale, timestep_of(args, kwargs))
        if batch is None or (s <= 0 and not self.return_branches):
            return None
        cfg, w = self._cfg()
        if cfg and batch % 2:
            raise ValueError(f"pag: CFG is on but the denoiser batch ({batch}) is not [uncond, cond]")
        n = batch // 2 if cfg else batch
        args, kwargs = append_rows(args, kwargs, batch, slice(batch - n, batch))
        self._branch = {"total": batch + n, "start": batch, "n": n, "cfg_scale": w, "scale": s}
        return args, kwargs

    def _fold_branch(self, module, args, kwargs, output):
        """Forward hook: ``[.., c, p]`` → ``[.., c']`` (or leave ``[u, c, p]`` with ``return_branches``)."""
        branch, self._branch = self._branch, None
        if branch is None or self.return_branches:
            return None
        sample = output_sample(output)  # [B + n, ...]
        start, n = branch["start"], branch["n"]
        body, perturbed = sample[:start], sample[start:]  # [B, ...], [n, ...]
        cond = fold_guidance(body[start - n:], perturbed, branch["scale"], branch["cfg_scale"])
        return with_output_sample(output, torch.cat([body[: start - n], cond]))

    # ---- the attention edit -------------------------------------------------------------------------------------
    def score_bias(self, ctx):
        """``[B, 1, Q, K]``: identity on the image block of the perturbed rows; None when no branch is running."""
        branch = self._branch
        if branch is None or ctx.batch != branch["total"]:
            return None
        if ctx.q_len != ctx.k_len:
            self._warn(("qk", ctx.layer), f"pag: layer {ctx.layer} has {ctx.q_len} queries but {ctx.k_len} keys; "
                                           "identity attention needs self-attention, layer left unperturbed")
            return None
        image = ctx.key_mask("image")[0]  # [K] bool; queries share the key positions
        return identity_bias(ctx.batch, slice(branch["start"], ctx.batch), image)
