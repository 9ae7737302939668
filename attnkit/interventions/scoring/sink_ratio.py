"""Attention-sink ratio, "When Attention Sink Emerges in Language Models" (Gu et al., ICLR 2025; repo
sail-sg/Attention-Sink), METHODS-2.md §10a.

Rule (released ``eval_sink_open_source.py``): every sample truncated to ``T = 64`` tokens (shorter ones are refused,
as the script asserts); one forward; for every layer and head the importance of key ``k`` is the mean attention it
receives from the queries that can see it, ``α(k) = (1/(T−k))·Σ_{i≥k} A_ik`` (0-based ``k``); the sink ratio is
``100 · mean over (samples, layers, heads) of 1[α(k) > ε]`` with a **strict** ``>`` and ``ε = 0.3``. The paper's
headline metric is ``k = 0``. GQA models are scored per query head. The script's data file is not in the repository;
pass any held-out natural text and record it (``data``).

Example (METHODS-2.md §10a worked example: one head, then a second head with α(0) = 0.25):
    >>> A = torch.tensor([[1, 0, 0, 0], [.7, .3, 0, 0], [.6, .2, .2, 0], [.5, .1, .1, .3]])
    >>> [round(x, 4) for x in key_importance(A).tolist()]
    [0.7, 0.2, 0.15, 0.3]
    >>> ratio_of(torch.tensor([[0.7, 0.2, 0.15, 0.3], [0.25, 0.3, 0.2, 0.1]]), eps=0.3, k=0)
    50.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.interventions.scoring._common import attention_maps, model_name
from attnkit.scores import HeadScores


def key_importance(A: torch.Tensor) -> torch.Tensor:
    """``α(k)`` of causal maps ``A [..., T, T]`` → ``[..., T]``: column sums divided by the ``T − k`` rows that see k."""
    T = A.shape[-1]
    return A.float().sum(-2) / torch.arange(T, 0, -1, device=A.device, dtype=torch.float32)


def ratio_of(alpha: torch.Tensor, eps: float = 0.3, k: int = 0) -> float:
    """``100 · mean 1[α(k) > ε]`` over every leading dimension of ``alpha [..., T]``."""
    return 100.0 * float((alpha[..., k] > eps).float().mean())


@dataclass
class SinkRatio:
    """The result: ``ratio`` (%), ``alpha [S, L, H, T]`` and the per-head mean ``α(k)`` as HeadScores."""

    ratio: float
    alpha: torch.Tensor
    scores: HeadScores
    eps: float
    k: int

    def at(self, k: int, eps: float | None = None) -> float:
        """The ratio for another key position / threshold from the same forward."""
        return ratio_of(self.alpha, self.eps if eps is None else eps, k)


def sink_ratio(model, input_ids: torch.Tensor, *, T: int = 64, eps: float = 0.3, k: int = 0,
               data: str = "") -> SinkRatio:
    """Sink ratio of ``model`` on ``input_ids [S, N ≥ T]`` (each sample truncated to its first ``T`` tokens).

    Example:
        >>> from attnkit.testing import tiny_causal_lm
        >>> res = sink_ratio(tiny_causal_lm("llama"), torch.randint(3, 100, (2, 8)), T=8)
        >>> res.alpha.shape, 0.0 <= res.ratio <= 100.0
        (torch.Size([2, 2, 4, 8]), True)
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < T:
        raise ValueError(f"sink ratio: every sample needs at least T={T} tokens, got input_ids of shape "
                         f"{tuple(input_ids.shape)}")
    ids = input_ids[:, :T]
    device = next(model.parameters()).device
    maps = attention_maps(model, {"input_ids": ids.to(device)}, queries="all")  # {layer: [S, H, T, T]}
    alpha = torch.stack([key_importance(maps[layer]) for layer in sorted(maps)], dim=1).cpu()  # [S, L, H, T]
    scores = HeadScores(alpha[..., k].mean(0), "sink-ratio", model_name(model), data,
                        {"T": T, "eps": eps, "k": k, "samples": ids.shape[0]})
    return SinkRatio(ratio_of(alpha, eps, k), alpha, scores, eps, k)
