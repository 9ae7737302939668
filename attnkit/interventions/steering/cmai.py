"""CMAI — cross-modality attention inhibition (Yang et al., arXiv 2411.15453).

Focus score of text query t on image token v, aggregated through text-to-text attention:
``F_{t,v} = Σ_{k ∈ text} A_{t,k} · A_{k,v}`` (post-softmax ``A`` of the same layer, head-averaged by default).
For every text query row, image keys outside the top ``keep_ratio`` (or ``keep_top``) by ``F`` are inhibited:
masked (``strength=0``, the default) or down-weighted by ``strength`` (adds ``log strength``) before the softmax,
so the row renormalises. Image query rows are untouched. There is no public code; the selection rule, the strength
and head averaging are configurable because the paper leaves them open.

The score needs the layer's own attention map, so this runs on the ``eager`` backend (``edit_scores``). For decode
steps the text→image rows of earlier tokens are kept in the per-layer state (``[B, h, T, N_prompt]``).

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_vlm, vlm_inputs
    >>> model = tiny_vlm("llava"); inputs = vlm_inputs("llava", model, batch=2)
    >>> with attnkit.attach(model, [CMAI(keep_ratio=0.5, layers=[1])]), torch.no_grad():
    ...     model(**inputs).logits.shape
    torch.Size([2, 24, 128])
"""

from __future__ import annotations

import math

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.kernels.masks import causal_allowed


def focus_scores(a_tt: torch.Tensor, a_ti: torch.Tensor) -> torch.Tensor:
    """``F = A_TT · A_TI``: ``[..., Q, T] @ [..., T, I] → [..., Q, I]``.

    Example (METHODS.md worked example):
        >>> f = focus_scores(torch.tensor([[.6, .4], [.3, .7]]), torch.tensor([[.5, .3, .2], [.1, .1, .8]]))
        >>> [[round(x, 2) for x in row] for row in f.tolist()]
        [[0.34, 0.22, 0.44], [0.22, 0.16, 0.62]]
    """
    return a_tt @ a_ti


def inhibited_pairs(focus: torch.Tensor, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Bool, same shape as ``focus [B, h, Q, K]``: image keys outside each row's top ``keep[b]`` by focus.

    Example:
        >>> f = torch.tensor([[[[.34, .22, .44], [.22, .16, .62]]]])
        >>> inhibited_pairs(f, torch.ones(1, 3, dtype=torch.bool), torch.tensor([2])).int().tolist()
        [[[[0, 1, 0], [0, 1, 0]]]]
    """
    img = image[:, None, None, :]  # [B, 1, 1, K]
    masked = focus.masked_fill(~img, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)  # [B, h, Q, K]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return img & (rank >= keep.view(-1, 1, 1, 1))


@register_intervention
class CMAI(Intervention):
    name = "cmai"
    conformance = {"neutral": {"keep_ratio": 1.0}, "active": {"keep_ratio": 0.5}}
    requires = frozenset({"text_decoder", "image_tokens"})
    description = "CMAI: inhibit text→image attention pairs with a low text-aggregated focus score"

    def __init__(self, keep_ratio: float = 0.5, keep_top: int | None = None, strength: float = 0.0,
                 per_head: bool = False, **target):
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"cmai: keep_ratio must be in (0, 1], got {keep_ratio}")
        super().__init__(**target)
        self.keep_ratio, self.keep_top, self.strength, self.per_head = keep_ratio, keep_top, strength, per_head

    def _keep_counts(self, image: torch.Tensor) -> torch.Tensor:
        n = image.sum(1)  # [B]
        if self.keep_top is not None:
            return n.clamp(max=self.keep_top)
        return (n.float() * self.keep_ratio + 0.5).floor().long().clamp(min=1)

    def edit_scores(self, scores, ctx):  # scores [B, H, Q, K] fp32, before the model's mask
        real, image, text = ctx.key_mask("real"), ctx.key_mask("image"), ctx.key_mask("text")  # [B, K]
        causal = causal_allowed(ctx.q_len, ctx.k_len, ctx.device)  # [Q, K]
        if ctx.query_rows is not None:  # a capture re-computing some rows after the main call
            causal = causal[ctx.query_rows.to(ctx.device)]
        allowed = real[:, None, None, :] & causal[None, None]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)  # [B, H, Q, K]
        probs = probs if self.per_head else probs.mean(1, keepdim=True)  # [B, h, Q, K]
        rows = self._image_rows(probs, image, ctx)  # [B, h, K, N]: every key's (row's) attention to prompt images
        n = rows.shape[-1]
        focus = focus_scores(probs * text[:, None, None, :], rows)  # [B, h, Q, N]
        blocked = inhibited_pairs(focus, image[:, :n], self._keep_counts(image[:, :n]))  # [B, h, Q, N]
        blocked &= ctx.query_mask("text")[:, None, :, None]
        bias = torch.zeros_like(probs).narrow(-1, 0, n).masked_fill(
            blocked, math.log(self.strength) if self.strength > 0 else float("-inf"))
        bias = torch.nn.functional.pad(bias, (0, ctx.k_len - n))  # [B, h, Q, K]
        return scores + bias

    def _image_rows(self, probs, image, ctx):
        """Attention rows to image keys for all positions so far: the state's rows plus this call's rows."""
        if ctx.query_rows is not None:  # captures read the rows the main call stored
            return ctx.state["rows"]
        prev = None if ctx.is_prefill else ctx.state.get("rows")  # [B, h, T_prev, N]
        n = prev.shape[-1] if prev is not None else ctx.k_len
        current = (probs * image[:, None, None, :])[..., :n]  # [B, h, Q, N]
        rows = current if prev is None else torch.cat([prev, current], dim=2)  # [B, h, K, N]
        ctx.state["rows"] = rows
        return rows
