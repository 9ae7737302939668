"""Streaming vs retrieval heads: the share of each row's attention inside the first ``num_sinks`` real tokens plus
the ``window`` most recent keys (a training-free stand-in for DuoAttention / RazorAttention head patterns). High
score → a streaming head (a sink + window cache loses little); low score → a retrieval head.

Example:
    >>> import torch
    >>> probs = torch.tensor([[[[0.1, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.2, 0.1, 0.7, 0.0],
    ...                          [0.3, 0.3, 0.1, 0.3]]]])
    >>> local_mass(probs, torch.ones(1, 4, dtype=torch.bool), num_sinks=1, window=1)[0, 0].tolist()
    [0.10000000149011612, 1.0, 0.8999999761581421, 0.6000000238418579]
"""

from __future__ import annotations

import torch

from attnkit.interventions.scoring._common import attention_maps, model_name, row_mean
from attnkit.scores import HeadScores


def local_mass(probs: torch.Tensor, real: torch.Tensor, num_sinks: int = 4, window: int = 64) -> torch.Tensor:
    """probs [B, H, Q, K] (causal, prefill, Q = K); real [B, K] → mass on sinks + local window per row [B, H, Q]."""
    q_len, k_len = probs.shape[-2:]
    sinks = (real.long().cumsum(1) <= num_sinks) & real  # [B, K]
    q_pos = torch.arange(k_len - q_len, k_len)[:, None]  # [Q, 1]
    k_pos = torch.arange(k_len)[None, :]  # [1, K]
    local = (k_pos <= q_pos) & (k_pos > q_pos - window)  # [Q, K]
    keep = sinks[:, None, :] | local[None]  # [B, Q, K]
    return (probs * keep[:, None]).sum(-1)


def streaming_scores(model, inputs: dict, num_sinks: int = 4, window: int = 64, data: str = "") -> HeadScores:
    """HeadScores of the sink + window mass, averaged over real query rows beyond ``num_sinks + window``."""
    ids = inputs["input_ids"]
    real = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    rows = real & (real.long().cumsum(1) > num_sinks + window)
    if not rows.any():
        raise ValueError(f"streaming_scores needs inputs longer than num_sinks + window = {num_sinks + window} tokens")
    maps = attention_maps(model, inputs)
    scores = torch.stack([row_mean(local_mass(maps[layer], real, num_sinks, window), rows) for layer in sorted(maps)])
    return HeadScores(scores, method="streaming-split", model=model_name(model), data=data,
                      params={"num_sinks": num_sinks, "window": window})
