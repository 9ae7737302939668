"""The ``torch`` backend: fused SDPA plus structured edits, no ``[Q, K]`` matrix for plain or temperature-scaled
attention and per-head output edits; pre-softmax biases go through SDPA's additive mask.

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

from attnkit.kernels.eager import output_stage
from attnkit.kernels.masks import additive_mask, causal_allowed
from attnkit.kernels.plan import head_vector

CAPABILITIES = frozenset({"query_scale", "score_bias", "edit_output"})


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


def torch_attention(q, k, v, mask, *, scaling, entries, make_ctx, causal=True, softcap=None, dropout=0.0):
    """Attention with query_scale / score_bias / edit_output edits. Returns out [B,H,Q,D]."""
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
                    b = b.float() * heads.view(1, -1, 1, 1)
                    bias = b if bias is None else bias + b
    if bias is not None:
        base = additive_mask(mask, q.shape[2], k.shape[2], causal, q.device)
        mask = bias if base is None else base + bias  # [B|1, H, Q|1, K] broadcast by SDPA
        causal = False
    out = sdpa(q, k, v, mask, scaling=scaling, causal=causal)  # [B, H, Q, D]
    return output_stage(out, entries, make_ctx)
