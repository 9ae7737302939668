"""MasaCtrl — mutual self-attention control (Cao et al., ICCV 2023; repo TencentARC/MasaCtrl), METHODS-2.md §5.2.

The batch holds ``[source, target, …]`` (×2 with classifier-free guidance: ``[u_src, u_tgt, c_src, c_tgt]``). In the
self-attention of the selected transformer blocks and steps, within each guidance group, every sample's queries
attend to the **source sample's** keys and values::

    out_b = softmax(q_b · k_srcᵀ / √d) · v_src        (the source keeps its own attention; cross-attention untouched)

Variants (flags): ``mode="union"`` — targets attend to ``[K_src; K_tgt]``; ``masks=(M_s, M_t)`` — binary source and
target foreground masks: a target query in ``M_t`` sees only the source keys in ``M_s`` (foreground pass), one
outside only the keys outside (background pass), i.e. ``M_t·out_fg + (1 − M_t)·out_bg`` of the code's two passes.
The mask variant builds a ``[Q, K]`` boolean per call; the plain and union modes never do (fused SDPA). A query
whose region holds no key at all (an empty mask on a coarse layer) sees every key instead of none.

``masks="auto"`` is the code's ``MutualSelfAttentionControlMaskAuto``: the masks come from the cross-attention maps
of chosen token positions (``source_token_ids`` for ``M_s`` from the source's map, ``target_token_ids`` for each
target's ``M_t`` from its own map; default ``[1]``, the first token after BOS, as the code). As in the code:

* the maps are those of the **current** denoiser call, from the cross-attention layers that ran **before** the
  self-attention layer being edited (a self-attention layer with none before it runs plain mutual self-attention);
* only the **conditional** half's maps are used (its masks then serve both CFG halves);
* per layer the map is averaged over heads, then over layers; the chosen token columns are summed, min-max normalised
  per image (a constant map gives an empty mask, where the code divides by zero) and binarised at
  ``mask_threshold`` (``≥``, the code's ``thres = 0.1``) — see :func:`cross_attention_mask`;
* the mask is resized to each self-attention layer's grid with nearest interpolation (the code's ``F.interpolate``
  default; binarising before or after a nearest resize is the same).

Which cross-attention layers: the code keeps those with exactly 16×16 queries (SD at 512 px: ``down_blocks.2`` and
``up_blocks.1``; the 8×8 mid block is left out). Here: those whose query count is the **largest not above**
``mask_resolution²`` (default ``mask_resolution``: the latent side / 4, i.e. 16 at 512 px, the code's choice);
when no cross-attention layer is that coarse (tiny test models), the coarsest one. Counts are learnt from the layers
that ran, so in the very first denoiser call a coarser layer not yet seen cannot be chosen. The source row keeps its
own attention, as in the code. Joint-attention (SD3, Flux) and video models are refused with ``masks="auto"``.
The paper describes the masks only as extracted from the cross-attention maps of the object token; no behaviour of
the paper differs from the code's that would need a flag.

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

With masks from the cross-attention of "cat" (token 2 of the source prompt, 3 of the target's):
    >>> auto = MasaCtrl(start_step=0, start_layer=3, masks="auto", source_token_ids=[2], target_token_ids=[3],
    ...                 mask_resolution=8)
    >>> with attnkit.attach(pipe, auto):
    ...     _ = pipe(["a cat", "a red cat"], latents=torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1),
    ...              num_inference_steps=2, output_type="latent")
    >>> auto.last_masks[0].shape, auto.last_masks[1].shape   # M_s [h, w] and M_t [targets, h, w] on the maps' grid
    (torch.Size([8, 8]), torch.Size([1, 8, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.diffusion.inject import append_kv, region_bias, replace_kv, resize_token_mask
from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.editing._common import (
    EditingIntervention,
    block_index_layers,
    check_steps,
    in_steps,
    token_grid,
    token_mask,
)
from attnkit.targets import Target

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
                 cfg: bool | None = None, source_token_ids=None, target_token_ids=None, mask_threshold: float = 0.1,
                 mask_resolution: int | None = None, **target):
        if mode not in MODES:
            raise ValueError(f"masactrl: mode must be one of {MODES}, got {mode!r}")
        if keys not in ("image", "all"):
            raise ValueError(f"masactrl: keys must be 'image' or 'all', got {keys!r}")
        auto = isinstance(masks, str)
        if auto and masks != "auto" or not auto and masks is not None and (
                not isinstance(masks, (tuple, list)) or len(masks) != 2):
            raise ValueError(f"masactrl: masks must be None, 'auto' or a pair (source mask, target mask) of [h, w] "
                             f"tensors, got {masks!r}")
        if not auto and (source_token_ids is not None or target_token_ids is not None or mask_resolution is not None):
            raise ValueError("masactrl: source_token_ids, target_token_ids and mask_resolution apply only with "
                             "masks='auto'")
        if isinstance(mask_threshold, bool) or not isinstance(mask_threshold, (int, float)) \
                or not 0.0 <= mask_threshold <= 1.0:
            raise ValueError(f"masactrl: mask_threshold must be a number in [0, 1], got {mask_threshold!r}")
        if mask_resolution is not None and (isinstance(mask_resolution, bool) or not isinstance(mask_resolution, int)
                                            or mask_resolution < 1):
            raise ValueError(f"masactrl: mask_resolution must be None or a positive int (tokens per side of the "
                             f"cross-attention maps, 16 at 512 px), got {mask_resolution!r}")
        super().__init__(**target)
        self._init_editing(num_steps, cfg)
        self.start_step, self.start_layer, self.end_layer = int(start_step), int(start_layer), end_layer
        self.source, self.mode, self.keys = int(source), mode, keys
        if auto:
            self.masks = "auto"
        else:
            self.masks = None if masks is None else tuple(torch.as_tensor(m, dtype=torch.float32) for m in masks)
        self.source_token_ids = _token_ids(source_token_ids, "source_token_ids")
        self.target_token_ids = _token_ids(target_token_ids, "target_token_ids")
        self.mask_threshold, self.mask_resolution = float(mask_threshold), mask_resolution
        self.steps = check_steps(steps, "masactrl")
        self.edited_calls = 0
        self.last_masks: tuple | None = None  # masks="auto": (M_s [h, w], M_t [targets, h, w]) of the last edit
        self.mask_grid: tuple | None = None  # masks="auto": the maps' grid (h, w) of the last edit
        self._cross: set = set()
        self._cross_counts: dict = {}  # latent (h, w) -> query counts of the cross-attention layers seen
        self._maps: dict = {}  # query count -> [[P, Q, T] cond maps averaged over heads] of the current call
        self._maps_call = None

    def setup(self, model) -> None:
        super().setup(model)
        self._cross = set()
        if self.masks != "auto":
            return
        if self._temporal:
            raise ValueError("masactrl: masks='auto' supports image pipelines only; this model has temporal "
                             "(video) attention layers")
        self._cross = {i for i, kind in enumerate(self._kinds) if kind == "cross"}
        if not self._cross:
            raise ValueError("masactrl: masks='auto' reads text cross-attention maps and this model has no "
                             "cross-attention layer (joint-attention models such as SD3/Flux are not supported)")
        self.target = Target(layers=sorted(set(self.target.layers) | self._cross), heads=self.target.heads,
                             modules=None)

    def install(self, handle) -> list:
        self._cross_counts, self._maps, self._maps_call, self.last_masks, self.mask_grid = {}, {}, None, None, None
        return super().install(handle)

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
        if ctx.layer in self._cross:
            self._record_cross(q, k, info)
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
        masks = self._layer_masks(q, rows, image_k, info)
        if masks is not None:
            region = self._region_bias(ctx, q, rows, image_k, *masks)
            bias = region if bias is None else bias + region
        self.edited_calls += 1
        return q, k, v, bias

    def _layer_masks(self, q, rows, image_k, info):
        """(M_s ``[1, n]``, M_t ``[1|B, n]``) on this layer's ``n`` image tokens, or None (no mask: plain mode, or
        ``masks="auto"`` before any cross-attention map of this call)."""
        if self.masks is None:
            return None
        n_img = int(image_k.sum()) if image_k is not None else q.shape[2]
        if self.masks != "auto":
            return tuple(token_mask(m, info, n_img).to(q.device)[None] for m in self.masks)
        built = self._auto_masks(info)
        if built is None:
            return None
        m_s, m_t = built  # [h, w], [P, h, w] on the maps' grid
        h, w = token_grid(info, n_img)
        m_s = resize_token_mask(m_s, h, w).to(q.device)  # [1, n]
        m_t = resize_token_mask(m_t, h, w).to(q.device)  # [P, n]
        return m_s, m_t[info.sample_of_rows(q.shape[0]) % info.per_group]  # M_t of each row's own sample

    # ---- masks="auto" ----------------------------------------------------------------------------------------------
    def _record_cross(self, q, k, info) -> None:
        """Keep this cross-attention layer's conditional map, averaged over heads, when its query count is (so far)
        the one the masks are read from."""
        if info.unit(q.shape[0]) != 1:
            raise ValueError("masactrl: masks='auto' supports image pipelines only (one attention row per sample)")
        if self._maps_call is not info:  # a new denoiser call: the maps of the previous one are dropped
            self._maps, self._maps_call = {}, info
        counts = self._cross_counts.setdefault((info.height, info.width), set())
        counts.add(q.shape[2])
        if q.shape[2] != self._map_count(info):
            return
        cond = info.edited_rows(q.shape[0], groups=[min(1, info.groups - 1)]).to(q.device)  # [B]
        qc, kc = q[cond].float(), k[cond].float()
        kc = kc.repeat_interleave(qc.shape[1] // kc.shape[1], dim=1)  # grouped kv heads → one per query head
        probs = torch.softmax(qc @ kc.transpose(-1, -2) * qc.shape[-1] ** -0.5, dim=-1)  # [P, H, Q, T]
        self._maps.setdefault(q.shape[2], []).append(probs.mean(1))  # [P, Q, T]

    def _map_count(self, info) -> int | None:
        """Query count of the cross-attention layers the masks are read from: the largest not above
        ``mask_resolution²`` (default: (latent side / 4)², SD's 16×16 at 512 px), else the smallest seen."""
        counts = self._cross_counts.get((info.height, info.width), set())
        if not counts:
            return None
        if self.mask_resolution is not None:
            wanted = self.mask_resolution ** 2
        else:
            wanted = (info.height // 4) * (info.width // 4) if info.height and info.width else 0
        below = [c for c in counts if c <= wanted]
        return max(below) if below else min(counts)

    def _auto_masks(self, info):
        """(M_s ``[h, w]``, M_t ``[P, h, w]``) from this call's maps so far, or None when there are none yet."""
        count = self._map_count(info)
        maps = self._maps.get(count) if self._maps_call is info else None
        if not maps:
            return None
        stacked = torch.stack(maps)  # [L, P, Q, T]
        n_text = stacked.shape[-1]
        for name, ids in (("source_token_ids", self.source_token_ids), ("target_token_ids", self.target_token_ids)):
            if max(ids) >= n_text:
                raise ValueError(f"masactrl: {name} {ids} index past the {n_text} text tokens of the prompts")
        grid = token_grid(info, count)
        m_s = cross_attention_mask(stacked[:, self.source:self.source + 1], self.source_token_ids, grid,
                                   self.mask_threshold)[0]  # [h, w]
        m_t = cross_attention_mask(stacked, self.target_token_ids, grid, self.mask_threshold)  # [P, h, w]
        targets = [i for i in range(m_t.shape[0]) if i != self.source]
        self.last_masks, self.mask_grid = (m_s.cpu(), m_t[targets].cpu()), grid
        return m_s, m_t

    def _region_bias(self, ctx, q, rows, image_k, m_s, m_t):
        """Two-region bias ``[B, 1, Q, K']`` from the source mask ``m_s [1, n]`` and target masks ``m_t [1|B, n]``
        on this layer's ``n`` image tokens: image queries take the target mask, source keys the source mask, the
        target's own keys (union mode) the target mask; text tokens (joint attention) are in both regions' view:
        their rows and columns are never masked."""
        q_len, device = q.shape[2], q.device
        q_image = ctx.query_mask("image")[0] if image_k is not None else torch.ones(q_len, dtype=torch.bool)
        own_image = image_k if image_k is not None else torch.ones(q_len, dtype=torch.bool)  # [K0]
        q_region = torch.full((m_t.shape[0], q_len), 2.0, device=device)  # 2: a text query (sees every key)
        q_region[:, q_image.to(device)] = m_t
        own_mask = m_t if self.mode == "union" else m_s  # replace: own slots hold source keys
        own = torch.full((own_mask.shape[0], own_image.shape[0]), 2.0, device=device)  # 2: a text key (always seen)
        own[:, own_image.to(device)] = own_mask
        k_region = torch.cat([own, m_s.expand(own.shape[0], -1)], 1) if self.mode == "union" else own
        return _region_bias_with_text(q_region, k_region, rows)


def _token_ids(ids, name: str) -> list[int]:
    """Validate a token-position list (an int, or a non-empty list of ints ≥ 0); None → ``[1]``, the code's default."""
    if ids is None:
        return [1]
    if isinstance(ids, int) and not isinstance(ids, bool):
        ids = [ids]
    if not isinstance(ids, (list, tuple)) or not ids or \
            not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"masactrl: {name} must be a token position or a non-empty list of positions (ints ≥ 0) "
                         f"in the tokenized prompt, got {ids!r}")
    return [int(i) for i in ids]


def cross_attention_mask(maps: torch.Tensor, token_ids, grid: tuple[int, int], threshold: float = 0.1,
                         eps: float = 0.0) -> torch.Tensor:
    """MaskAuto's mask (``aggregate_cross_attn_map`` then ``≥ thres``): cross-attention maps ``[L, P, Q, T]`` (each
    layer's map averaged over heads) → mean over the layers → sum of the ``token_ids`` columns → ``[P, h, w]`` on
    ``grid`` → min-max normalised per image → ``1`` where ``≥ threshold``, else ``0``. ``eps > 0``: normalise as
    ``(x − min) / (max − min + eps)`` (DiTCtrl's ``+1e-6``) instead of exactly (a constant map → 0 either way).

    Example (one layer, one image on a 2×2 grid, token 1):
        >>> maps = torch.tensor([[0.5, 0.3], [0.5, 0.6], [0.5, 0.22], [0.5, 0.2]]).view(1, 1, 4, 2)
        >>> cross_attention_mask(maps, [1], (2, 2)).tolist()   # normalised [[0.25, 1.0], [0.05, 0.0]]
        [[[1.0, 1.0], [0.0, 0.0]]]
    """
    image = maps.float().mean(0)[..., list(token_ids)].sum(-1)  # [P, Q]
    image = image.reshape(image.shape[0], *grid)  # [P, h, w]
    low = image.amin(dim=(1, 2), keepdim=True)
    span = image.amax(dim=(1, 2), keepdim=True) - low
    if eps > 0:
        image = (image - low) / (span + eps)
    else:
        image = torch.where(span > 0, (image - low) / span.clamp_min(1e-30), torch.zeros_like(image))
    return (image >= threshold).float()


def _region_bias_with_text(q_region, k_region, rows):
    """:func:`region_bias` where region value 2 marks text tokens that every token may see; q_region ``[B|1, Q]``,
    k_region ``[B|1, K]``. A query row left without any visible key sees every key."""
    bias = region_bias((q_region > 0.5).float(), (k_region > 0.5).float(), rows=rows)  # [B,1,Q,K]
    free = (q_region[:, :, None] == 2) | (k_region[:, None, :] == 2)  # [B|1, Q, K]
    bias = bias.masked_fill(free[:, None], 0.0)
    return bias.masked_fill(torch.isinf(bias).all(-1, keepdim=True), 0.0)


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
