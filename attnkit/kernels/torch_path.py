"""The ``torch`` backend: fused SDPA plus structured edits, no ``[Q, K]`` matrix for plain or temperature-scaled
attention, per-head output edits and post-softmax group reweighting (exact, from per-group partial results, see
:mod:`attnkit.kernels.grouped`); pre-softmax biases go through SDPA's additive mask.

Example:
    >>> import torch
    >>> q = k = v = torch.randn(1, 2, 4, 8)
    >>> out = torch_attention(q, k, v, None, scaling=8 ** -0.5, entries=[], make_ctx=None, causal=True)
    >>> out.shape
    torch.Size([1, 2, 4, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.interventions.base import key_group_ids
from attnkit.kernels.eager import output_stage, real_queries
from attnkit.kernels.grouped import combine_groups, group_mass, group_partials
from attnkit.kernels.stats import key_mass
from attnkit.kernels.masks import additive_mask, causal_allowed
from attnkit.kernels.plan import head_vector, restrict_bias, select_heads

CAPABILITIES = frozenset({"query_scale", "score_bias", "edit_output", "group_factors", "key_stats"})
#: capability pairs this backend cannot combine in one layer (an arbitrary score bias breaks group partials and
#: the key statistics, which are computed from q and k)
UNSUPPORTED_COMBINATIONS = (frozenset({"score_bias", "group_factors"}), frozenset({"score_bias", "key_stats"}))


def sdpa(q, k, v, mask, *, scaling, causal) -> torch.Tensor:
    """Plain attention with transformers' mask conventions. q [B,H,Q,D], k/v [B,Hkv,K,D] → [B,H,Q,D]."""
    q_len, k_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    is_causal = causal and mask is None and q_len > 1
    if is_causal and k_len != q_len:  # SDPA's is_causal is top-left aligned: give the bottom-right mask instead
        mask, is_causal = causal_allowed(q_len, k_len, q.device)[None, None], False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, is_causal=is_causal, enable_gqa=gqa)


def torch_attention(q, k, v, mask, *, scaling, entries, make_ctx, causal=True, softcap=None, dropout=0.0,
                    kernel: str = "torch"):
    """Attention with query_scale / score_bias / group_factors / edit_output edits. Returns out [B,H,Q,D].

    ``kernel`` selects the group-partials implementation ("torch" or "triton")."""
    if softcap is not None:
        raise ValueError("the torch backend does not support logit softcapping; use backend='eager'")
    bias = None
    for entry in entries:
        iv, caps = entry.intervention, entry.intervention.capabilities()
        heads = entry.heads_on(q.device)
        if "query_scale" in caps or "score_bias" in caps:
            ctx = make_ctx(entry)
            if "query_scale" in caps:
                q = q * head_vector(iv.query_scale(ctx), heads, 1.0).to(q.dtype).view(1, -1, 1, 1)
            if "score_bias" in caps:
                b = iv.score_bias(ctx)
                if b is not None:
                    b = restrict_bias(b, heads)
                    bias = b if bias is None else bias + b
    if bias is not None:
        base = additive_mask(mask, q.shape[2], k.shape[2], causal, q.device)
        mask = bias if base is None else base + bias  # [B|1, H, Q|1, K] broadcast by SDPA
        causal = False
    for entry in entries:
        if "key_stats" in entry.intervention.capabilities():
            ctx = make_ctx(entry)
            col = key_mass(q, k, scale=scaling, causal=causal, key_padding=ctx.key_padding,
                           query_select=real_queries(ctx), window=ctx.window, backend=kernel)  # [B, H, K]
            entry.intervention.key_stats(col, ctx)
    grouped = [e for e in entries if "group_factors" in e.intervention.capabilities()]
    if grouped:
        out = grouped_attention(q, k, v, mask, grouped, scaling=scaling, causal=causal, make_ctx=make_ctx,
                                kernel=kernel)
    else:
        out = sdpa(q, k, v, mask, scaling=scaling, causal=causal)  # [B, H, Q, D]
    return output_stage(out, entries, make_ctx)


def grouped_attention(q, k, v, mask, grouped_entries, *, scaling, causal, make_ctx, kernel="torch") -> torch.Tensor:
    """Post-softmax group reweighting without the ``[Q, K]`` matrix: per-group partials (O_g, log Z_g), the
    intervention's factors from the group masses, then ``Σ_g M_g c_g O_g / Σ_g M_g c_g``. Heads outside every
    entry's targets get plain attention. q [B,H,Q,D], k/v [B,Hkv,K,D] → [B,H,Q,D]."""
    out = None
    for entry in grouped_entries:
        iv, ctx = entry.intervention, make_ctx(entry)
        window = ctx.window
        if mask is not None and ctx.tracker is None:
            raise NotImplementedError(
                f"{iv.name}: the torch backend reweights groups under causal/padding/window masks only; this call "
                "has an explicit attention mask — use backend='eager'")
        key_padding = ctx.key_padding  # [B, K] True = real token
        groups = key_group_ids(ctx, iv.key_groups())  # [B, K]
        num_groups = len(iv.key_groups()) + 1
        present = int(groups.max().item()) + 1 if groups.numel() else 1  # trailing empty groups cost nothing
        out_g, lse_g = group_partials(q, k, v, groups, present, scale=scaling,
                                      causal=causal, key_padding=key_padding,
                                      window=window, backend=kernel)  # [B,H,Q,G,D], [B,H,Q,G]
        heads = entry.heads_on(q.device)
        mass = torch.nn.functional.pad(group_mass(lse_g), (0, num_groups - present))  # [B,H,Q,G]
        factors = iv.group_factors(mass, ctx).float()[..., :present]  # [B,H,Q,G_present]
        factors = select_heads(factors, torch.ones_like(factors), heads)
        edited = combine_groups(out_g, lse_g, factors, dtype=q.dtype)  # [B,H,Q,D]
        out = edited if out is None else select_heads(edited, out, heads)
    return out
