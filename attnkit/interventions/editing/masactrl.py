"""MasaCtrl — mutual self-attention control (Cao et al., ICCV 2023; repo TencentARC/MasaCtrl), METHODS-2.md §5.2.

The batch holds ``[source, target, …]`` (×2 with classifier-free guidance: ``[u_src, u_tgt, c_src, c_tgt]``). In the
self-attention of the selected transformer blocks and steps, within each guidance group, every sample's queries
attend to the **source sample's** keys and values::

    out_b = softmax(q_b · k_srcᵀ / √d) · v_src        (the source keeps its own attention; cross-attention untouched)

Variants (flags): ``mode="union"`` — targets attend to ``[K_src; K_tgt]``; ``masks=(M_s, M_t)`` — binary source and
target foreground masks: a target query in ``M_t`` sees only the source keys in ``M_s`` (foreground pass), one
outside only the keys outside (background pass), i.e. ``M_t·out_fg + (1 − M_t)·out_bg`` of the code's two passes.
The mask variant builds a ``[Q, K]`` boolean per call; the plain and union modes never do (fused SDPA). The
cross-attention ``MaskAuto`` variant is not implemented.

Layers use the code's numbering: the ``i``-th self-attention in execution order is transformer block ``i``
(SD-1.x: down 0–5, mid 6, up 7–15; blocks ``start_layer…`` = 10–15 by default = ``up_blocks.2``/``.3``; SDXL uses
44, 54 or 64). Steps ``start_step…`` (4–49 of 50) come from the pipeline's scheduler, never from call counts. On
joint-attention models only the image keys/values are shared (``keys="image"``; ``"all"`` shares the text too).
Video (AnimateDiff): spatial layers only, frame ``f`` of a target reads frame ``f`` of the source.

Example (a tiny SD pipeline, prompts [source, target] from one latent):
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sd")
    >>> masa = MasaCtrl(start_step=0, start_layer=3)
    >>> with attnkit.attach(pipe, masa):
    ...     out = pipe(["a cat", "a red cat"], latents=torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1),
    ...                num_inference_steps=3, output_type="latent").images
    >>> out.shape, masa.edited_calls > 0
    (torch.Size([2, 4, 8, 8]), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.diffusion.inject import append_kv, region_bias, replace_kv
from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.editing._common import (
    EditingIntervention,
    block_index_layers,
    check_steps,
    in_steps,
    token_mask,
)

MODES = ("replace", "union")


@register_intervention
class MasaCtrl(EditingIntervention, Intervention):
    name = "masactrl"
    description = "MasaCtrl: target samples read the source sample's self-attention keys and values"
    requires = frozenset({"denoiser"})
    conformance = {
        "neutral": {"start_step": 0, "start_layer": 0, "steps": [0, 0]},
        "active": {"start_step": 0, "start_layer": 0},
        "not_applicable": {"batched": "by design the target samples read the source sample's keys and values"}}

    def __init__(self, start_step: int = 4, start_layer: int = 10, end_layer: int | None = None, source: int = 0,
                 mode: str = "replace", masks=None, keys: str = "image", steps=None, num_steps: int | None = None,
                 cfg: bool | None = None, **target):
        if mode not in MODES:
            raise ValueError(f"masactrl: mode must be one of {MODES}, got {mode!r}")
        if keys not in ("image", "all"):
            raise ValueError(f"masactrl: keys must be 'image' or 'all', got {keys!r}")
        if masks is not None and (not isinstance(masks, (tuple, list)) or len(masks) != 2):
            raise ValueError("masactrl: masks must be a pair (source mask, target mask) of [h, w] tensors")
        super().__init__(**target)
        self._init_editing(num_steps, cfg)
        self.start_step, self.start_layer, self.end_layer = int(start_step), int(start_layer), end_layer
        self.source, self.mode, self.keys = int(source), mode, keys
        self.masks = None if masks is None else tuple(torch.as_tensor(m, dtype=torch.float32) for m in masks)
        self.steps = check_steps(steps, "masactrl")
        self.edited_calls = 0

    def default_layers(self, description) -> list[int]:
        layers = block_index_layers(description, self.start_layer, self.end_layer)
        if not layers:
            n = len(block_index_layers(description, 0))
            raise ValueError(f"masactrl: start_layer {self.start_layer} is past this model's {n} self-attention "
                             f"blocks (choose start_layer < {n}; SD-1.x uses 10, SDXL 44/54/64)")
        return layers

    def _active(self, info) -> bool:
        if info is None:
            return True
        window = self.steps if self.steps is not None else [self.start_step, max(info.num_steps, self.start_step)]
        return in_steps(info.step, info.num_steps, window)

    def edit_kv(self, q, k, v, ctx):
        """Targets read the source's K/V. q [B,H,Q,D], k/v [B,H,K,D]."""
        info = self.call
        if info is None or not self._active(info):
            return None
        if info.per_group < 2:
            self._calls.warn("single", "masactrl: each guidance group holds one sample; nothing to edit (the batch "
                                       "is [source, target, …] per group)")
            return None
        rows = info.edited_rows(q.shape[0], [i for i in range(info.per_group) if i != self.source]).to(q.device)
        src = info.source_rows(q.shape[0], self.source).to(q.device)  # [B]
        k_src, v_src = k[src], v[src]
        joint = self._kinds[ctx.layer] == "joint" and self.keys == "image"
        image_k = ctx.key_mask("image")[0] if joint else None  # [K] bool
        bias = None
        if self.mode == "union":
            if joint:
                k_src = k_src[:, :, image_k]
                v_src = v_src[:, :, image_k]
            k, v, bias = append_kv(k, v, k_src, v_src, rows=rows)
        else:
            k, v = replace_kv(k, v, k_src, v_src, rows, keys=image_k)
        if self.masks is not None:
            region = self._region_bias(ctx, q, k, rows, image_k)
            bias = region if bias is None else bias + region
        self.edited_calls += 1
        return q, k, v, bias

    def _region_bias(self, ctx, q, k, rows, image_k):
        """Two-region bias ``[B, 1, Q, K']`` from the (source, target) masks on this layer's token grid: image queries
        take the target mask, source keys the source mask, the target's own keys (union mode) the target mask; text
        tokens (joint attention) are in both regions' view: their rows and columns are never masked."""
        q_len = q.shape[2]
        q_image = ctx.query_mask("image")[0] if image_k is not None else torch.ones(q_len, dtype=torch.bool)
        own_image = image_k if image_k is not None else torch.ones(q_len, dtype=torch.bool)  # [K0]
        n_img = int(own_image.sum())
        m_s, m_t = (token_mask(m, self.call, n_img).to(q.device) for m in self.masks)  # [n_img] each
        q_region = torch.full((q_len,), 2.0, device=q.device)  # 2: a text query (sees every key)
        q_region[q_image.to(q.device)] = m_t
        own = torch.full((own_image.shape[0],), 2.0, device=q.device)  # 2: a text key (seen by every query)
        own[own_image.to(q.device)] = m_t if self.mode == "union" else m_s  # replace: own slots hold source keys
        k_region = torch.cat([own, m_s]) if self.mode == "union" else own  # union: source keys appended
        return _region_bias_with_text(q_region, k_region, rows)


def _region_bias_with_text(q_region, k_region, rows):
    """:func:`region_bias` where region value 2 marks text tokens that every token may see."""
    bias = region_bias((q_region > 0.5).float()[None], (k_region > 0.5).float()[None], rows=rows)  # [B,1,Q,K]
    free = (q_region[:, None] == 2) | (k_region[None, :] == 2)  # [Q, K]
    return bias.masked_fill(free[None, None], 0.0)


# ---- real-image editing (playground_real) ---------------------------------------------------------------------------
@dataclass
class MasaCtrlEdit:
    """What :func:`edit_real` returns: ``[source reconstruction, target]`` latents (and images), the inversion."""

    latents: torch.Tensor
    images: torch.Tensor | None
    inversion: object
    edited_calls: int


def edit_real(pipe, image, target_prompt: str, *, source_prompt: str = "", num_inference_steps: int = 50,
              guidance_scale: float = 7.5, ref_intermediate_latents: bool = True, output_type: str = "pt",
              method: MasaCtrl | None = None, **call_kwargs) -> MasaCtrlEdit:
    """MasaCtrl's real-image editing: invert ``image`` (``[1, 3, H, W]`` in [-1, 1], or latents) with Convention A,
    prompt ``source_prompt`` and CFG ``guidance_scale``; then sample ``[source_prompt, target_prompt]`` from the
    inverted latent with mutual self-attention. ``ref_intermediate_latents``: before every step the source row is
    reset to the inversion latent of that step, so it reconstructs the input. ``method``: a configured
    :class:`MasaCtrl` (default: the paper's settings)."""
    import attnkit
    from attnkit.diffusion.inversion import call_pipeline, ddim_invert, decode, encode, output_latents

    z0 = image if not (image.dim() == 4 and image.shape[1] == 3) else encode(pipe, image)
    inversion = ddim_invert(pipe, z0, prompt=source_prompt, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, **call_kwargs)
    method = method or MasaCtrl()
    latents = inversion.final.repeat(2, *([1] * (z0.dim() - 1)))

    def reset_source(pipe_, i, t, kwargs):
        current = kwargs["latents"]
        if ref_intermediate_latents and i + 1 < len(inversion.timesteps):  # before step i + 1 (never after the last)
            current = current.clone()
            current[:1] = inversion.latents[-2 - i].to(current)
        return {"latents": current}

    extra = dict(call_kwargs)
    extra["callback_on_step_end"] = reset_source
    with torch.no_grad(), attnkit.attach(pipe, method):
        out = call_pipeline(pipe, latents, [source_prompt, target_prompt], num_inference_steps, guidance_scale, extra)
    result = output_latents(out)
    images = None if output_type == "latent" else decode(pipe, result)
    return MasaCtrlEdit(result, images, inversion, method.edited_calls)
