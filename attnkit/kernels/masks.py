"""Mask helpers shared by the backends.

transformers hands attention functions one of: ``None`` (plain causal, or nothing masked), a bool mask
``[B,1,Q,K]`` (True = attend, from ``sdpa_mask``) or an additive float mask (from ``eager_mask``).

Example:
    >>> causal_allowed(2, 3).int().tolist()
    [[1, 1, 0], [1, 1, 1]]
"""

from __future__ import annotations

import torch


def causal_allowed(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Bool ``[Q, K]``: query i (absolute position ``K-Q+i``) may see key j iff ``j <= K-Q+i`` (bottom-right)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # [Q, 1]
    k_pos = torch.arange(k_len, device=device)[None, :]  # [1, K]
    return k_pos <= q_pos  # [Q, K]


def allowed_mask(mask: torch.Tensor | None, q_len: int, k_len: int, causal: bool, device) -> torch.Tensor | None:
    """Bool ``[B|1, 1, Q, K]`` of allowed pairs, or None when every pair is allowed."""
    if mask is None:
        if causal and q_len > 1:
            return causal_allowed(q_len, k_len, device)[None, None]  # [1, 1, Q, K]
        return None
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # additive float mask: 0 = allowed, ~min = masked


def additive_mask(mask: torch.Tensor | None, q_len: int, k_len: int, causal: bool, device) -> torch.Tensor | None:
    """Float additive mask ``[B|1, 1, Q, K]`` (0 / -inf) or None."""
    if mask is not None and mask.dtype != torch.bool:
        return mask.float()
    allowed = allowed_mask(mask, q_len, k_len, causal, device)
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
