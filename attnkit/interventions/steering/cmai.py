"""CMAI — cross-modality attention inhibition (Yang et al., arXiv 2411.15453).

Focus score of text query t on image token v, aggregated through text-to-text attention:
``F_{t,v} = Σ_{k ∈ text} A_{t,k} · A_{k,v}`` (post-softmax ``A`` of the same layer, head-averaged by default).
For every text query row, image keys outside the top ``keep_ratio`` (or ``keep_top``) by ``F`` are inhibited:
masked (``strength=0``, the default) or down-weighted by ``strength`` (adds ``log strength``) before the softmax,
so the row renormalises. Image query rows are untouched. There is no public code; the selection rule, the strength
and head averaging are configurable because the paper leaves them open.

For decode steps the text→image rows of earlier tokens are kept in the per-layer state (``[B, h, T, N_prompt]``,
indexed by sequence position, so a sliding-window layer whose cache holds only the last keys reads the rows of the
keys it sees).

Why eager only (no fused path): the focus score is second order in the layer's attention. At a prefill,
``F_{t,v} = Σ_k A_{t,k} A_{k,v}`` needs, for every query row t, that row's whole distribution over the text keys k;
the per-key statistics the fused backends compute (``key_stats``: the attention each key receives, summed over the
rows, ``Σ_t A_{t,k}``) have lost the row index, so F cannot be rebuilt from them, and the inhibition then needs a
per-(row, key) mask that depends on F. At a decode step (one row) the statistics *are* the row, but the fused
backends call ``score_bias`` before ``key_stats`` (their FUSED_UNSUPPORTED pair), so a bias computed from this call's
statistics is not possible there either. An exact fused CMAI would need a backend step that returns
``A·W`` for a caller-supplied ``W`` (``F = softmax(QKᵀ)·(R ⊙ text)``, one extra SDPA call with the stored rows R as
values) before the biased call — a kernels change, not taken here. So it materialises the ``[B, H, Q, K]`` scores
(``edit_scores``) and runs on the ``eager`` backend.

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
        image, text = ctx.key_mask("image"), ctx.key_mask("text")  # [B, K]
        probs = torch.softmax(self._masked(scores, ctx), -1).nan_to_num(0.0)  # [B, H, Q, K] the layer's own A
        probs = probs if self.per_head else probs.mean(1, keepdim=True)  # [B, h, Q, K]
        key_pos = self._key_positions(ctx)  # [B, K] sequence position of each key
        rows = self._image_rows(probs, image, key_pos, ctx)  # [B, h, T, N]: every position's attention to images
        n = rows.shape[-1]
        prompt_image = ctx.tracker.mask("image")[:, :n].to(ctx.device)  # [B, N]
        key_rows = torch.gather(rows, 2, key_pos[:, None, :, None].expand(-1, rows.shape[1], -1, n))  # [B,h,K,N]
        focus = focus_scores(probs * text[:, None, None, :], key_rows)  # [B, h, Q, N]
        blocked = inhibited_pairs(focus, prompt_image, self._keep_counts(prompt_image))  # [B, h, Q, N]
        blocked &= ctx.query_mask("text")[:, None, :, None]
        in_prompt = key_pos < n  # [B, K]
        per_key = torch.gather(blocked, 3, key_pos.clamp(max=n - 1)[:, None, None, :].expand(
            -1, blocked.shape[1], blocked.shape[2], -1)) & in_prompt[:, None, None, :]  # [B, h, Q, K]
        bias = torch.zeros_like(probs).masked_fill(
            per_key, math.log(self.strength) if self.strength > 0 else float("-inf"))  # [B, h, Q, K]
        return scores + bias

    @staticmethod
    def _masked(scores: torch.Tensor, ctx) -> torch.Tensor:
        """Scores under the model's own mask (padding, causality, sliding windows, bidirectional image blocks)."""
        if ctx.mask is None:  # no mask description: causal over real keys
            causal = causal_allowed(ctx.q_len, ctx.k_len, ctx.device)  # [Q, K]
            if ctx.query_rows is not None:
                causal = causal[ctx.query_rows.to(ctx.device)]
            allowed = ctx.key_mask("real")[:, None, None, :] & causal[None, None]  # [B, 1, Q, K]
            return scores.masked_fill(~allowed, float("-inf"))
        rows = slice(None) if ctx.query_rows is None else ctx.query_rows
        _, ok, bias = ctx.mask.block(rows, ctx.device, restrict=False)  # [B|1, H|1, Q, K] bool, fp32 | None
        scores = scores if bias is None else scores + bias.float()
        return scores.masked_fill(~ok, float("-inf"))

    @staticmethod
    def _key_positions(ctx) -> torch.Tensor:
        """Long ``[B, K]``: the sequence position of each key of this call (the last K positions, or a pruned or
        windowed cache's own positions)."""
        where = ctx.tracker.positions_for(ctx.layer, ctx.k_len)
        if isinstance(where, slice):
            return torch.arange(where.start, where.stop, device=ctx.device).expand(ctx.batch, -1)
        return where.to(ctx.device).long()

    def _image_rows(self, probs, image, key_pos, ctx):
        """Attention rows to the prompt's image positions for every position so far ``[B, h, T, N]``: the state's
        rows plus this call's rows (scattered from key slots to positions)."""
        if ctx.query_rows is not None:  # captures read the rows the main call stored
            return ctx.state["rows"]
        prev = None if ctx.is_prefill else ctx.state.get("rows")  # [B, h, T_prev, N]
        n = prev.shape[-1] if prev is not None else ctx.tracker.length
        in_prompt = key_pos < n  # [B, K]
        weights = probs * (image & in_prompt)[:, None, None, :]  # [B, h, Q, K]
        current = torch.zeros(*probs.shape[:3], n, dtype=probs.dtype, device=probs.device)  # [B, h, Q, N]
        index = key_pos.clamp(max=n - 1)[:, None, None, :].expand_as(weights)
        current.scatter_add_(3, index, weights)
        rows = current if prev is None else torch.cat([prev, current], dim=2)  # [B, h, T, N]
        ctx.state["rows"] = rows
        return rows
