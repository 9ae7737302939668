"""Reference backend: materialises scores and probabilities ``[B,H,Q,K]`` and applies every hook literally.

It is the ground truth the fast backends are tested against, and the only backend for hooks that need the full
matrix (``edit_scores``, ``edit_probs``).

Example:
    >>> import torch
    >>> q = k = v = torch.randn(1, 2, 4, 8)
    >>> out, probs = eager_attention(q, k, v, None, scaling=8 ** -0.5, entries=[], make_ctx=None, causal=True)
    >>> out.shape, torch.allclose(probs.sum(-1), torch.ones(1, 2, 4))
    (torch.Size([1, 2, 4, 8]), True)
"""

from __future__ import annotations

import torch

from attnkit.kernels.masks import KeyMask, allowed_mask, attach_mask
from attnkit.kernels.plan import entry_caps, query_factors, restrict_bias, select_heads


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, Hkv, N, D]`` → ``[B, H, N, D]``: query head h uses key/value head ``h // (H // Hkv)``."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def score_stage(scores: torch.Tensor, entries, make_ctx) -> torch.Tensor:
    """Apply query_scale, score_bias and edit_scores of every entry, in order. scores: [B,H,Q,K] fp32."""
    for entry in entries:
        iv, heads = entry.intervention, entry.heads_on(scores.device)
        caps = entry_caps(entry)
        if not caps & {"query_scale", "score_bias", "edit_scores"}:
            continue
        ctx = make_ctx(entry)
        if "query_scale" in caps:
            scores = scores * query_factors(iv.query_scale(ctx), heads)  # [B|1, H, Q|1, 1]
        if "score_bias" in caps:
            bias = iv.score_bias(ctx)
            if bias is not None:
                scores = scores + restrict_bias(bias, heads)
        if "edit_scores" in caps:
            scores = select_heads(iv.edit_scores(scores, ctx).float(), scores, heads)
    return scores


def reweight_groups(probs: torch.Tensor, group_ids: torch.Tensor, factors_fn, heads,
                    num_groups: int | None = None) -> torch.Tensor:
    """Post-softmax group reweighting ``p'_j = p_j c_g(j) / Σ_g M_g c_g`` with ``M_g`` the group masses.

    probs [B,H,Q,K], group_ids [B,K] long in [0, num_groups), factors_fn: masses [B,H,Q,G] → factors [B,H,Q,G]."""
    if num_groups is None:
        num_groups = int(group_ids.max().item()) + 1 if group_ids.numel() else 1
    onehot = torch.nn.functional.one_hot(group_ids, num_groups).float()  # [B, K, G]
    mass = torch.einsum("bhqk,bkg->bhqg", probs, onehot)  # [B, H, Q, G]
    factors = factors_fn(mass).float()  # [B, H, Q, G]
    factors = select_heads(factors, torch.ones_like(factors), heads)
    norm = (mass * factors).sum(-1, keepdim=True).clamp_min(1e-30)  # [B, H, Q, 1]
    per_key = torch.gather(factors, 3, group_ids[:, None, None, :].expand(*probs.shape[:3], -1))  # [B,H,Q,K]
    return probs * per_key / norm


def real_queries(ctx) -> torch.Tensor | None:
    """``[B, Q]`` bool of this call's real (non-padding) queries, or None when every query is real."""
    return ctx.query_mask("real") if ctx.tracker is not None else None


def wanting_stats(entries, make_ctx):
    """``(entry, ctx)`` for each entry whose ``key_stats`` hook wants this call's statistics: not a capture
    re-computing a few rows (the statistics would be partial), and :meth:`Intervention.wants_key_stats` says yes.
    Every backend asks this before it computes column statistics.

    Example (an intervention whose statistics are fixed at the prefill, as ACT's are):
        >>> from types import SimpleNamespace as NS
        >>> iv = NS(capabilities=lambda: {"key_stats"}, wants_key_stats=lambda ctx: ctx.is_prefill)
        >>> entry = NS(intervention=iv)
        >>> [len(list(wanting_stats([entry], lambda e: NS(query_rows=None, is_prefill=p)))) for p in (True, False)]
        [1, 0]
    """
    for entry in entries:
        if "key_stats" in entry_caps(entry):
            ctx = make_ctx(entry)
            if ctx.query_rows is None and entry.intervention.wants_key_stats(ctx):
                yield entry, ctx


def stats_stage(probs: torch.Tensor, entries, make_ctx) -> None:
    """Give ``key_stats`` hooks the attention each key receives from the real queries. probs: [B,H,Q,K]."""
    for entry, ctx in wanting_stats(entries, make_ctx):
        q_real = real_queries(ctx)
        rows = probs if q_real is None else probs * q_real[:, None, :, None]
        entry.intervention.key_stats(rows.sum(dim=2), ctx)  # [B, H, K]


def prob_stage(probs: torch.Tensor, entries, make_ctx) -> torch.Tensor:
    """Apply group_factors and edit_probs of every entry, in order. probs: [B,H,Q,K] fp32."""
    for entry in entries:
        iv, heads = entry.intervention, entry.heads_on(probs.device)
        caps = entry_caps(entry)
        if not caps & {"group_factors", "edit_probs"}:
            continue
        ctx = make_ctx(entry)
        if "group_factors" in caps:
            ids = iv.key_group_ids(ctx)  # [B, K]
            num_groups = len(iv.key_groups()) + 1
            probs = reweight_groups(probs, ids, lambda m: iv.group_factors(m, ctx), heads, num_groups)
        if "edit_probs" in caps:
            probs = select_heads(iv.edit_probs(probs, ctx).float(), probs, heads)
    return probs


def output_stage(out: torch.Tensor, entries, make_ctx) -> torch.Tensor:
    """Apply edit_output of every entry, in order. out: [B,H,Q,D]."""
    for entry in entries:
        if "edit_output" in entry_caps(entry):
            edited = entry.intervention.edit_output(out, make_ctx(entry)).to(out.dtype)
            out = edited if getattr(entry, "all_heads", False) else select_heads(edited, out,
                                                                                 entry.heads_on(out.device))
    return out


def eager_probs(q, k, mask, *, scaling, entries, make_ctx, causal, softcap=None) -> torch.Tensor:
    """Edited attention probabilities ``[B,H,Q,K]`` (fp32). q [B,H,Q,D], k [B,Hkv,K,D]."""
    num_heads, q_len, k_len = q.shape[1], q.shape[2], k.shape[2]
    make_ctx = attach_mask(make_ctx, KeyMask.build(q_len, k_len, mask=mask, causal=causal, recognise_structure=False))
    k = repeat_kv(k, num_heads)  # [B, H, K, D]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # [B, H, Q, K]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = score_stage(scores, entries, make_ctx)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask.float()
    else:
        allowed = allowed_mask(mask, q_len, k_len, causal, q.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows → 0
    stats_stage(probs, entries, make_ctx)
    return prob_stage(probs, entries, make_ctx)


def eager_attention(q, k, v, mask, *, scaling, entries, make_ctx, causal=True, softcap=None, dropout=0.0,
                    rows: torch.Tensor | None = None):
    """Reference attention with edits. Returns ``(out [B,H,Q,D], probs [B,H,Q,K])`` (``rows``: the probabilities
    of those query rows only, ``[B,H,R,K]``)."""
    make_ctx = attach_mask(make_ctx, KeyMask.build(q.shape[2], k.shape[2], mask=mask, causal=causal,
                                                   recognise_structure=False))
    probs = eager_probs(q, k, mask, scaling=scaling, entries=entries, make_ctx=make_ctx, causal=causal, softcap=softcap)
    if dropout > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    v = repeat_kv(v, q.shape[1])  # [B, H, K, D]
    out = torch.matmul(probs.to(v.dtype), v)  # [B, H, Q, D]
    return output_stage(out, entries, make_ctx), (probs if rows is None else probs[:, :, rows])
