"""Sink detection: the first token, ACT's "hidden" sinks (column attention mass above a threshold) and VAR's
visual sinks (massive activation in the sink dimensions of the residual stream).

Example (METHODS.md §2 detection example):
    >>> import torch
    >>> A = torch.tensor([[1, 0, 0, 0], [.6, .4, 0, 0], [.5, .3, .2, 0], [.4, .3, .05, .25]])[None, None]
    >>> act_column_scores(A)[0, 0].tolist()
    [0.625, 0.3333333432674408, 0.125, 0.25]
    >>> act_sinks(A)[0, 0].int().tolist()   # all exceed 0.1, the first detected one is dropped
    [0, 1, 1, 1]
"""

from __future__ import annotations

import torch


def first_token_sinks(real: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, N]``: the first real token of each sample (the classic attention sink).

    Example:
        >>> first_token_sinks(torch.tensor([[0, 1, 1], [1, 1, 1]]).bool()).int().tolist()
        [[0, 1, 0], [1, 0, 0]]
    """
    idx = real.int().argmax(dim=1)  # [B]
    out = torch.zeros_like(real, dtype=torch.bool)
    out[torch.arange(real.shape[0]), idx] = real.any(dim=1)
    return out


def act_column_scores(probs: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """ACT's column score ``c_j = Σ_{i≥j} A_ij / #{real queries i ≥ j}`` → ``[B, H, K]`` (prefill, causal).

    probs ``[B, H, N, N]``; ``real`` ``[B, N]`` marks real tokens (left padding); without padding the divisor is
    ``N − j`` exactly as in the released code."""
    n = probs.shape[-1]
    real = torch.ones(probs.shape[0], n, dtype=torch.bool, device=probs.device) if real is None else real
    rows = probs.float() * real[:, None, :, None]  # [B, H, N, N]: padded query rows do not count
    col_sum = rows.sum(dim=2)  # [B, H, K]
    later_real = real.flip(1).long().cumsum(1).flip(1)  # [B, K]: real queries at positions ≥ j
    return col_sum / later_real.clamp_min(1)[:, None, :].float()


def act_sinks(probs: torch.Tensor, real: torch.Tensor | None = None, *, test: str = "code", theta: float = 0.1,
              alpha: float = 5.0, drop_first: str = "detected") -> torch.Tensor:
    """ACT sink set per head, bool ``[B, H, K]``.

    ``test="code"``: ``c_j > theta`` (released code, θ = 0.1); ``test="paper"``: ``c_j > alpha / N`` (relative to the
    uniform level, α = 5, N = real tokens). ``drop_first``: ``"detected"`` drops the first detected sink of each
    head (code: ``indices[1:]``), ``"token"`` spares only the first real token, ``"none"`` keeps all."""
    real_mask = torch.ones(probs.shape[0], probs.shape[-1], dtype=torch.bool, device=probs.device) if real is None \
        else real.to(probs.device)
    rows = probs.float() * real_mask[:, None, :, None]  # [B, H, N, N]: padded query rows do not count
    return act_sinks_from_columns(rows.sum(dim=2), real_mask, test=test, theta=theta, alpha=alpha,
                                  drop_first=drop_first)


def act_sinks_from_columns(col_sum: torch.Tensor, real: torch.Tensor | None = None, *, test: str = "code",
                           theta: float = 0.1, alpha: float = 5.0, drop_first: str = "detected") -> torch.Tensor:
    """:func:`act_sinks` from column sums ``[B, H, K]`` (attention each key gets from the real queries of a causal
    prefill) — what the fused backends provide without the ``[Q, K]`` matrix."""
    real_mask = torch.ones(col_sum.shape[0], col_sum.shape[-1], dtype=torch.bool, device=col_sum.device) \
        if real is None else real.to(col_sum.device)
    later_real = real_mask.flip(1).long().cumsum(1).flip(1)  # [B, K]: real queries at positions ≥ j
    scores = col_sum.float() / later_real.clamp_min(1)[:, None, :].float()  # [B, H, K]
    if test == "code":
        sinks = scores > theta
    elif test == "paper":
        n_real = real_mask.sum(1).clamp_min(1).float()  # [B]
        sinks = scores > (alpha / n_real)[:, None, None]
    else:
        raise ValueError(f"unknown ACT sink test {test!r}; use 'code' or 'paper'")
    sinks &= real_mask[:, None, :]
    if drop_first == "detected":
        first = sinks.int().argmax(dim=-1, keepdim=True)  # [B, H, 1] index of the first detected sink
        sinks = sinks.scatter(-1, first, False)
    elif drop_first == "token":
        sinks &= ~first_token_sinks(real_mask)[:, None, :]
    elif drop_first != "none":
        raise ValueError(f"unknown drop_first {drop_first!r}; use 'detected', 'token' or 'none'")
    return sinks


def sink_dim_values(hidden: torch.Tensor, dims, eps: float = 1e-6) -> torch.Tensor:
    """VAR's ``φ(x_j) = max_{d∈dims} |x_j[d] / RMS(x_j)|`` (RMS without gain, fp32) → ``[B, N]``.

    ``dims``: a list of dimensions for every sample, or a long tensor ``[B, k]`` with each sample's own.

    Example:
        >>> h = torch.ones(2, 2, 4); h[0, 1, 2] = 8.0; h[1, 0, 3] = 8.0
        >>> sink_dim_values(h, torch.tensor([[2], [3]])).gt(1.5).int().tolist()   # 8 / RMS = 1.95, 1 / RMS = 0.24
        [[0, 1], [1, 0]]
    """
    x = hidden.float()  # [B, N, D]
    rms = x.pow(2).mean(-1, keepdim=True).add(eps).sqrt()  # [B, N, 1]
    if isinstance(dims, torch.Tensor) and dims.dim() == 2:  # per-sample dimensions
        index = dims.to(x.device)[:, None, :].expand(-1, x.shape[1], -1)  # [B, N, k]
        picked = torch.gather(x, 2, index)  # [B, N, k]
    else:
        picked = x[..., [int(d) for d in dims]]  # [B, N, k]
    return (picked / rms).abs().amax(-1)  # [B, N]


def massive_activation_sinks(hidden: torch.Tensor, dims, tau: float = 20.0, real: torch.Tensor | None = None):
    """VAR sink tokens: bool ``[B, N]`` with ``φ > tau`` (strict, as in the code), real tokens only.

    Example:
        >>> h = torch.ones(1, 3, 8); h[0, 1, 5] = 100.0
        >>> massive_activation_sinks(h, dims=[5], tau=2.0).int().tolist()
        [[0, 1, 0]]
    """
    sinks = sink_dim_values(hidden, dims) > tau
    return sinks if real is None else sinks & real.to(sinks.device)


def top_activation_dims(hidden: torch.Tensor, num: int = 2, real: torch.Tensor | None = None) -> list[int]:
    """The ``num`` hidden dimensions with the largest ``max_j |x_j[d]/RMS(x_j)|`` (a data-driven guess at the sink
    dimensions when a model's are unknown). hidden ``[B, N, D]``."""
    x = hidden.float()
    x = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # [B, N, D]
    if real is not None:
        x = x * real.to(x.device)[..., None]
    return x.abs().amax(dim=(0, 1)).topk(num).indices.tolist()
