"""Attention statistics without the N×N matrix: column mass per key and selected rows' probabilities.

* :func:`key_mass` — attention probability each key receives, summed over selected queries ``[B,H,K]`` (FastV
  scoring, sink detection, head scoring). Query rows are processed in chunks; each chunk holds complete rows, so
  its softmax (and row log-sum-exp) is exact and memory stays O(chunk·K).
* :func:`attention_rows` — softmax probabilities of a few query rows ``[B,H,R,K]`` (attention captures).

Masks follow :mod:`attnkit.kernels.grouped` (bottom-right causal alignment, left padding, sinks + window); rows with
no allowed key are all zeros.
"""

from __future__ import annotations

import torch

from attnkit.kernels.grouped import (
    allowed_mask,
    check_shapes,
    gqa_scores,
    key_index,
    query_chunk,
    safe_softmax,
    sink_flags,
)

__all__ = ["key_mass", "attention_rows"]


def _row_probs(q_rows, k, qpos, kidx, *, scale, causal, key_padding, sinks, window):
    """Probabilities ``[B,Hkv,R,C,Kr]`` of the query rows ``q_rows [B,H,C,D]`` at positions ``qpos [C]``."""
    ok = allowed_mask(qpos, kidx, causal=causal, key_padding=key_padding, sinks=sinks, window=window)
    s = gqa_scores(q_rows, k[:, :, kidx], scale)  # [B,Hkv,R,C,Kr]
    p, _ = safe_softmax(s, ok.unsqueeze(1))
    return p


def key_mass(q, k, *, scale: float | None = None, causal: bool = True, key_padding=None, query_select=None,
             window: int | None = None, num_sinks: int = 0, chunk: int = 256, backend: str = "torch") -> torch.Tensor:
    """Attention mass each key receives, summed over the selected queries → ``[B,H,K]`` fp32.

    ``query_select [B,Q]`` bool (None = every query). Only rows selected in some sample are computed, so the
    FastV case (last query only) costs one row. ``backend``: ``"torch"`` (chunked), ``"eager"`` (one chunk)
    or ``"triton"`` (fused two-pass kernel).

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
        >>> m = key_mass(q, k)
        >>> m.shape, torch.allclose(m.sum(-1), torch.full((1, 2), 6.0))
        (torch.Size([1, 2, 6]), True)
    """
    B, H, Hkv, Q, K, D = check_shapes(q, k)
    scale = D ** -0.5 if scale is None else float(scale)
    if backend == "triton":
        from attnkit.kernels import triton as tk

        return tk.key_mass(q, k, scale=scale, causal=causal, key_padding=key_padding, query_select=query_select,
                           window=window, num_sinks=num_sinks)
    if backend not in ("torch", "eager"):
        raise ValueError(f"unknown backend {backend!r}; choose 'eager', 'torch' or 'triton'")
    sinks = sink_flags(key_padding, num_sinks, K, q.device)
    if query_select is None:
        rows = torch.arange(Q, device=q.device)
        weight = None
    else:
        rows = query_select.any(0).nonzero().flatten()  # rows selected in at least one sample
        weight = query_select.to(torch.float32)  # [B,Q]
    mass = torch.zeros(B, H, K, dtype=torch.float32, device=q.device)  # [B,H,K]
    C = rows.numel() if backend == "eager" else max(1, min(chunk, query_chunk(B, H, rows.numel() or 1, K)))
    for c0 in range(0, rows.numel(), max(C, 1)):
        r = rows[c0:c0 + C]
        qpos = K - Q + r  # [C] absolute positions
        if backend == "eager":
            kidx = torch.arange(K, device=q.device)
        else:
            kidx = key_index(int(qpos.min()), int(qpos.max()) + 1, K, causal=causal, window=window, sinks=sinks,
                             device=q.device)
        p = _row_probs(q[:, :, r], k, qpos, kidx, scale=scale, causal=causal, key_padding=key_padding,
                       sinks=sinks, window=window)  # [B,Hkv,R,C,Kr]
        if weight is not None:
            p = p * weight[:, r][:, None, None, :, None]
        col = p.sum(3).reshape(B, H, -1)  # [B,H,Kr]
        mass.index_add_(2, kidx, col)
    return mass


def attention_rows(q, k, rows, *, scale: float | None = None, causal: bool = True, key_padding=None,
                   window: int | None = None, num_sinks: int = 0) -> torch.Tensor:
    """Softmax probabilities of the selected query rows → ``[B,H,R,K]`` fp32 (masked keys get 0).

    ``rows`` is a LongTensor ``[R]`` of indices into the ``Q`` queries (negative indices count from the end).

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
        >>> p = attention_rows(q, k, torch.tensor([0, 5]))
        >>> p.shape, p[0, 0, 0, 1:].abs().max().item()   # row 0 sees only key 0
        (torch.Size([1, 2, 2, 6]), 0.0)
    """
    B, H, Hkv, Q, K, D = check_shapes(q, k)
    scale = D ** -0.5 if scale is None else float(scale)
    rows = torch.as_tensor(rows, dtype=torch.long, device=q.device) % Q  # [R]
    sinks = sink_flags(key_padding, num_sinks, K, q.device)
    kidx = torch.arange(K, device=q.device)
    p = _row_probs(q[:, :, rows], k, K - Q + rows, kidx, scale=scale, causal=causal, key_padding=key_padding,
                   sinks=sinks, window=window)  # [B,Hkv,Rep,R,K]
    return p.reshape(B, H, rows.numel(), K)
