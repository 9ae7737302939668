"""Attention statistics without the N×N matrix: column mass per key and selected rows' probabilities.

* :func:`key_mass` — attention probability each key receives, summed over selected queries ``[B,H,K]`` (FastV
  scoring, sink detection, head scoring). Query rows are processed in chunks; each chunk holds complete rows, so
  its softmax (and row log-sum-exp) is exact and memory stays O(chunk·K).
* :func:`attention_rows` — softmax probabilities of a few query rows ``[B,H,R,K]`` (attention captures).

Masks follow :mod:`attnkit.kernels.masks`: pass the model's own ``mask`` (exact for any mask; ``causal`` and
``window`` are then hints) or the structured arguments (bottom-right causal alignment, left padding, sinks +
window); rows with no allowed key are all zeros.
"""

from __future__ import annotations

import torch

from attnkit.kernels.backends import kernel_name
from attnkit.kernels.grouped import gqa_scores, gqa_view, safe_softmax
from attnkit.kernels.masks import KeyMask, check_shapes, query_chunk

__all__ = ["key_mass", "attention_rows"]


def _row_probs(q, k, keys: KeyMask, rows: torch.Tensor, *, scale, restrict: bool):
    """``(kidx [Kr], p [B,Hkv,R,C,Kr])``: probabilities of the query rows ``rows [C]`` over the keys they may see."""
    kidx, ok, bias = keys.block(rows, q.device, restrict)  # [Kr], [B|1,H|1,C,Kr], fp32 | None
    s = gqa_scores(q.index_select(2, rows), k.index_select(2, kidx), scale)  # [B,Hkv,R,C,Kr]
    if bias is not None:
        s = s + gqa_view(bias, k.shape[1])
    p, _ = safe_softmax(s, gqa_view(ok, k.shape[1]))
    return kidx, p


def key_mass(q, k, *, scale: float | None = None, mask=None, causal: bool = True, key_padding=None,
             query_select=None, window: int | None = None, num_sinks: int = 0, chunk: int = 256,
             backend: str = "torch") -> torch.Tensor:
    """Attention mass each key receives, summed over the selected queries → ``[B,H,K]`` fp32.

    ``query_select [B,Q]`` bool (None = every query). Only rows selected in some sample are computed, so the
    FastV case (last query only) costs one row. ``backend``: ``"torch"`` (chunked; ``"flex"`` runs it too),
    ``"eager"`` (one chunk) or ``"triton"`` (fused two-pass kernel). ``mask``: the model's attention mask, see the module docstring.

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
        >>> m = key_mass(q, k)
        >>> m.shape, torch.allclose(m.sum(-1), torch.full((1, 2), 6.0))
        (torch.Size([1, 2, 6]), True)
        >>> prefix = torch.ones(6, 6).tril().bool(); prefix[:, :3] = True   # prefix LM: keys 0-2 see each other
        >>> flat = torch.zeros(1, 1, 6, 8)                                 # q = 0: uniform over the allowed keys
        >>> [round(x, 4) for x in key_mass(flat, k[:, :1], mask=prefix)[0, 0].tolist()]
        [1.6167, 1.6167, 1.6167, 0.6167, 0.3667, 0.1667]
    """
    B, H, Hkv, Q, K, D = check_shapes(q, k)
    scale = D ** -0.5 if scale is None else float(scale)
    backend = kernel_name(backend)
    keys = KeyMask.build(Q, K, mask=mask, causal=causal, key_padding=key_padding, window=window, num_sinks=num_sinks)
    if backend == "triton":
        from attnkit.kernels import triton as tk

        return tk.key_mass(q, k, scale=scale, mask=keys, query_select=query_select)
    if backend == "flex":
        backend = "torch"  # flex has no column statistics of its own: the torch chunked pass
    if query_select is not None and bool(query_select.all()):
        query_select = None  # every query real: no weights, contiguous chunks
    if backend == "torch" and keys.structured and keys.window is None and not (keys.causal and Q > K):
        return _structured_mass(q, k, keys, query_select, scale=scale)
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
        kidx, p = _row_probs(q, k, keys, r, scale=scale, restrict=backend != "eager")  # [Kr], [B,Hkv,R,C,Kr]
        if weight is not None:
            p = p * weight[:, r][:, None, None, :, None]
        col = p.sum(3).reshape(B, H, -1)  # [B,H,Kr]
        mass.index_add_(2, kidx, col)
    return mass


def _mass_chunk(B: int, H: int, K: int) -> int:
    """Query rows per chunk of the structured key-mass pass: a ``[B,H,C,K]`` fp32 block of ≤ 2**20 elements (4 MiB,
    cache-sized: its five in-place passes then run from cache), 16 ≤ C ≤ 128."""
    return int(max(16, min(128, (1 << 20) // max(1, B * H * K))))


def _structured_mass(q, k, keys: KeyMask, query_select, *, scale: float) -> torch.Tensor:
    """Key mass under a causal (or no) + key-padding mask → ``[B,H,K]``: per chunk of query rows one score matmul
    on the keys they can see, in place ``masked_fill`` (the causal tail and padding only), ``- max``, ``exp``, and
    the column sums as one product with the rows' ``1 / Z`` (times the query weights): no softmax copy."""
    B, H, Hkv, Q, K, D = check_shapes(q, k)
    R = H // Hkv
    P0 = K - Q  # absolute position of query 0
    if query_select is None:
        rows, weight = None, None
    else:
        rows = query_select.any(0).nonzero().flatten()  # [n] rows selected in some sample
        weight = query_select.to(torch.float32)  # [B,Q]
    n = Q if rows is None else rows.numel()
    pad = None if keys.key_padding is None else ~keys.key_padding.to(device=q.device, dtype=torch.bool)  # [B,K]
    mass = torch.zeros(B, Hkv, R, 1, K, dtype=torch.float32, device=q.device)  # [B,Hkv,R,1,K]
    C = _mass_chunk(B, H, K)
    for c0 in range(0, n, C):
        c1 = min(n, c0 + C)
        r = torch.arange(c0, c1, device=q.device) if rows is None else rows[c0:c1]  # [C] query indices
        q_c = q[:, :, c0:c1] if rows is None else q.index_select(2, r)  # [B,H,C,D]
        first, last = int(r[0]), int(r[-1])
        hi = P0 + last + 1 if keys.causal else K  # keys any of these rows may see
        s = torch.matmul(q_c.float().reshape(B, Hkv, R * (c1 - c0), D), k[:, :, :hi].float().transpose(-1, -2))
        s = s.mul_(scale).view(B, Hkv, R, c1 - c0, hi)  # [B,Hkv,R,C,hi]
        if keys.causal and P0 + first + 1 < hi:  # only columns after the first row's position can be masked
            lo = P0 + first + 1
            future = torch.arange(lo, hi, device=q.device)[None, :] > (P0 + r)[:, None]  # [C, hi-lo]
            s[..., lo:].masked_fill_(future, float("-inf"))
        if pad is not None:
            s = s.masked_fill_(pad[:, None, None, None, :hi], float("-inf"))
        top = s.amax(dim=-1, keepdim=True)  # [B,Hkv,R,C,1]
        e = s.sub_(top.masked_fill_(torch.isneginf(top), 0.0)).exp_()  # unnormalised probabilities, 0 if masked
        z = e.sum(dim=-1, keepdim=True)  # [B,Hkv,R,C,1]
        inv = torch.where(z > 0, z, 1.0).reciprocal_().masked_fill_(z == 0, 0.0)  # 1/Z, 0 on empty rows
        if weight is not None:
            inv = inv * weight.index_select(1, r)[:, None, None, :, None]  # [B,1,1,C,1]
        mass[..., :hi] += torch.matmul(inv.transpose(-1, -2), e)  # [B,Hkv,R,1,hi]
    return mass.view(B, H, K)


def attention_rows(q, k, rows, *, scale: float | None = None, mask=None, causal: bool = True, key_padding=None,
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
    keys = KeyMask.build(Q, K, mask=mask, causal=causal, key_padding=key_padding, window=window, num_sinks=num_sinks)
    _, p = _row_probs(q, k, keys, rows, scale=scale, restrict=False)  # [B,Hkv,Rep,R,K]
    return p.reshape(B, H, rows.numel(), K)
