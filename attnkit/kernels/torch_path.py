"""The ``torch`` backend: fused SDPA plus structured edits under the model's own attention mask, with no ``[Q, K]``
tensor beyond that mask: plain or temperature-scaled attention (per-head or per-row factors) goes to SDPA with the
model's mask as given; pre-softmax biases, post-softmax group reweighting (exact, from per-group partial results,
see :mod:`attnkit.kernels.grouped`) and key statistics run query-chunked or on the span decomposition, the latter
only when the mask provably is causal + padding (:class:`attnkit.kernels.masks.KeyMask`).

Example:
    >>> import torch
    >>> q = k = v = torch.randn(1, 2, 4, 8)
    >>> out = torch_attention(q, k, v, None, scaling=8 ** -0.5, entries=[], make_ctx=None, causal=True)
    >>> out.shape
    torch.Size([1, 2, 4, 8])
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

from attnkit.kernels.eager import output_stage, real_queries, repeat_kv, reweight_groups, wanting_stats
from attnkit.kernels.grouped import (DECODE_ROWS, combine_groups, group_mass, group_member, group_partials,
                                     masked_attention, row_reweight, row_sums)
from attnkit.kernels.masks import KeyMask, allowed_mask, attach_mask, causal_allowed
from attnkit.kernels.plan import query_factors, restrict_bias, select_heads
from attnkit.kernels.stats import key_mass


def sdpa(q, k, v, mask, *, scaling, causal) -> torch.Tensor:
    """Plain attention with transformers' mask conventions. q [B,H,Q,D], k/v [B,Hkv,K,D] → [B,H,Q,D].

    GQA as transformers' own SDPA function does it (``enable_gqa`` without a mask, repeated K/V with one), so an
    edit that changes nothing reproduces the stock model bit for bit on every torch version."""
    q_len, k_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None:
        k, v, gqa = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), False
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    is_causal = causal and mask is None and q_len > 1
    if is_causal and k_len != q_len:  # SDPA's is_causal is top-left aligned: give the bottom-right mask instead
        mask, is_causal = causal_allowed(q_len, k_len, q.device)[None, None], False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, is_causal=is_causal, enable_gqa=gqa)


class _contexts:
    """``make_ctx`` memoised per plan entry for one attention call (every stage reads the same context), with
    :meth:`attach` giving each context the call's :class:`~attnkit.kernels.masks.KeyMask` as ``ctx.mask``."""

    def __init__(self, make_ctx):
        self.make_ctx, self.made, self.keys = make_ctx, {}, None

    def __call__(self, entry, *args, **kwargs):
        if args or kwargs or self.make_ctx is None:  # a context for some rows: not shared
            return attach_mask(self.make_ctx, self.keys)(entry, *args, **kwargs) if self.make_ctx else None
        ctx = self.made.get(id(entry))
        if ctx is None:
            ctx = self.made[id(entry)] = self.make_ctx(entry)
            self._set_mask(ctx)
        return ctx

    def attach(self, keys) -> None:
        self.keys = keys
        for ctx in self.made.values():
            self._set_mask(ctx)

    def _set_mask(self, ctx) -> None:
        if ctx is not None and self.keys is not None:
            try:
                ctx.mask = self.keys
            except AttributeError:  # a frozen or slotted stand-in context
                pass


def torch_attention(q, k, v, mask, *, scaling, entries, make_ctx, causal=True, softcap=None, dropout=0.0,
                    kernel: str = "torch", rows: torch.Tensor | None = None):
    """Attention with query_scale / score_bias / group_factors / key_stats / edit_output edits under the model's
    ``mask`` (None, bool ``[B,1,Q,K]`` True = attend, or additive float). Returns out [B,H,Q,D].

    ``kernel`` selects the group-partials and key-statistics implementation ("torch" or "triton"). With ``rows``
    (query indices ``[R]``) it returns ``(out, probs [B,H,R,K])``: the edited probabilities of those rows, from the
    same scaled queries, biases and group factors that produced ``out`` (no hook runs twice)."""
    if softcap is not None:
        raise ValueError("the torch backend does not support logit softcapping; use backend='eager'")
    ctx_of = _contexts(make_ctx)  # one context per entry and call, shared by the stages
    window = getattr(ctx_of(entries[0]), "window", None) if entries else None
    keys = KeyMask.build(q.shape[2], k.shape[2], mask=mask, causal=causal, window=window)
    ctx_of.attach(keys)
    bias = None
    for entry in entries:
        iv, caps = entry.intervention, entry.caps
        if "query_scale" in caps or "score_bias" in caps:
            ctx = ctx_of(entry)
            heads = entry.heads_on(q.device)
            if "query_scale" in caps:
                q = q * query_factors(iv.query_scale(ctx), heads).to(q.dtype)  # [B|1,H,Q|1,1] per head or row
            if "score_bias" in caps:
                b = iv.score_bias(ctx)
                if b is not None:
                    b = restrict_bias(b, heads)
                    bias = b if bias is None else bias + b
    for entry, ctx in wanting_stats(entries, ctx_of):
        col = key_mass(q, k, scale=scaling, mask=keys, query_select=real_queries(ctx), backend=kernel)  # [B,H,K]
        entry.intervention.key_stats(col, ctx)
    grouped = [e for e in entries if "group_factors" in e.caps]
    applied: list = []
    if grouped:
        out = grouped_attention(q, k, v, keys, grouped, scaling=scaling, make_ctx=ctx_of, kernel=kernel,
                                applied=applied)
    elif bias is not None:
        out = masked_attention(q, k, v, keys, bias, scale=scaling)  # [B, H, Q, D]: one fused call or query chunks
    else:
        out = sdpa(q, k, v, mask, scaling=scaling, causal=causal)  # [B, H, Q, D]
    out = output_stage(out, entries, ctx_of)
    if rows is None:
        return out
    return out, row_probs(q, k, mask, rows, scaling=scaling, causal=causal, bias=bias, applied=applied)


def row_probs(q, k, mask, rows, *, scaling, causal, bias=None, applied=()) -> torch.Tensor:
    """Edited probabilities ``[B,H,R,K]`` (fp32) of the query rows ``rows [R]``: scores of the (already scaled)
    queries, plus ``bias``, under the model's ``mask``, softmax, then each group reweighting in ``applied``
    (``(heads, group_ids, factors [B,H,Q,G])`` as :func:`grouped_attention` used them). O(R·K) memory."""
    q_len, k_len = q.shape[2], k.shape[2]
    k = repeat_kv(k, q.shape[1])  # [B, H, K, D]
    scores = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)) * scaling  # [B, H, R, K]
    if bias is not None:
        scores = scores + (bias[..., rows, :] if bias.shape[-2] == q_len else bias).float()
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + (mask[..., rows, :] if mask.shape[-2] == q_len else mask).float()
    else:
        allowed = allowed_mask(mask, q_len, k_len, causal, q.device)  # [B|1, 1, Q, K] or None
        if allowed is not None:
            scores = scores.masked_fill(~(allowed[..., rows, :] if allowed.shape[-2] == q_len else allowed),
                                        float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # [B, H, R, K]; rows with no allowed key → 0
    for heads, group_ids, factors in applied:
        picked = factors[:, :, rows] if factors.shape[2] == q_len else factors  # [B, H, R, G]
        edited = reweight_groups(probs, group_ids, lambda mass: picked, torch.ones_like(heads), picked.shape[-1])
        probs = select_heads(edited, probs, heads)
    return probs


def grouped_attention(q, k, v, keys: KeyMask, grouped_entries, *, scaling, make_ctx, kernel="torch",
                      applied: list | None = None, partials=None) -> torch.Tensor:
    """Post-softmax group reweighting without the ``[Q, K]`` matrix: per-group partials (O_g, log Z_g) under the
    mask ``keys``, the intervention's factors from the group masses, then ``Σ_g M_g c_g O_g / Σ_g M_g c_g``. Heads
    outside every entry's targets get plain attention. q [B,H,Q,D], k/v [B,Hkv,K,D] → [B,H,Q,D]."""
    out = None
    for entry in grouped_entries:
        iv, ctx = entry.intervention, make_ctx(entry)
        groups = iv.key_group_ids(ctx)  # [B, K]
        num_groups = len(iv.key_groups()) + 1
        layout = _layout(groups, ctx)
        present = layout.present  # trailing empty groups cost nothing
        heads = entry.heads_on(q.device)
        if kernel == "torch" and q.shape[2] <= DECODE_ROWS:  # decode: one pass over the keys, no group outputs
            sums = row_sums(q, k, v, groups, present, keys, scale=scaling, member=layout.member)
            mass = sums.mass  # [B,H,Q,G_present]; all 0 on a row that sees no key (a masked call)
        else:
            if partials is not None:  # another backend's partials (flex)
                out_g, lse_g = partials(q, k, v, groups, present, keys, scale=scaling)
            else:
                out_g, lse_g = group_partials(q, k, v, groups, present, scale=scaling, mask=keys, backend=kernel,
                                              materialise=False)  # [B,H,Q,G,D] (or its pieces), [B,H,Q,G]
            mass = group_mass(lse_g)
        if present < num_groups:
            mass = torch.nn.functional.pad(mass, (0, num_groups - present))  # [B,H,Q,G]
        factors = iv.group_factors(mass, ctx).float()[..., :present]  # [B,H,Q,G_present]
        if not entry.all_heads:
            factors = select_heads(factors, torch.ones_like(factors), heads)
        if applied is not None:  # what captures need to reproduce these rows' edited probabilities
            applied.append((heads, groups, factors))
        if kernel == "torch" and q.shape[2] <= DECODE_ROWS:
            edited = row_reweight(sums, factors, dtype=q.dtype)  # [B,H,Q,D]
        else:
            edited = combine_groups(out_g, lse_g, factors, mass=mass[..., :present], dtype=q.dtype)  # [B,H,Q,D]
        out = edited if out is None else select_heads(edited, out, heads)
    return out


class GroupLayout:
    """Group ids ``[B, K]``, the groups that have keys (``present`` = 1 + the largest id) and, built on first use (the
    decode rows), their one-hot membership ``member [B, G_present, K]`` fp32."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self.present = int(ids.max()) + 1 if ids.numel() else 1

    @cached_property
    def member(self) -> torch.Tensor:
        return group_member(self.ids, self.present)


def _layout(groups: torch.Tensor, ctx) -> GroupLayout:
    """``groups``' layout, computed once per forward for ids that every layer shares (span ids come memoised per
    forward: the same tensor object in each layer); the stored layout keeps its ids alive, so an id() seen again in
    this forward is the same tensor."""
    layout = ctx.per_forward(("group_layout", id(groups)), lambda: GroupLayout(groups)) if ctx is not None else None
    return layout if layout is not None and layout.ids is groups else GroupLayout(groups)
