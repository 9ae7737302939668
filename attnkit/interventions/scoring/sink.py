"""Sink score per head: mean attention mass on sink tokens over the real query rows (excluding the sink rows).

Heads with a high score are "active" sink heads, those with a low score "dormant" with respect to the sink.

Example:
    >>> import torch
    >>> from attnkit.testing import tiny_causal_lm
    >>> hs = sink_scores(tiny_causal_lm("llama"), {"input_ids": torch.tensor([[1, 5, 7, 9, 11]])})
    >>> hs.scores.shape, bool(((hs.scores >= 0) & (hs.scores <= 1)).all())
    (torch.Size([2, 4]), True)
"""

from __future__ import annotations

import torch

from attnkit.interventions.scoring._common import attention_maps, model_name, row_mean
from attnkit.interventions.sinks.detect import first_token_sinks
from attnkit.scores import HeadScores


def sink_mass(probs: torch.Tensor, sinks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """probs [B, H, Q, K], sinks [B, K] bool, rows [B, Q] bool → mean sink mass per head [H]."""
    mass = (probs * sinks[:, None, None, :]).sum(-1)  # [B, H, Q]
    return row_mean(mass, rows)


def sink_scores(model, inputs: dict, sinks: torch.Tensor | None = None, data: str = "") -> HeadScores:
    """Score every head by its attention to ``sinks`` (bool ``[B, N]``; default: each sample's first real token)."""
    ids = inputs["input_ids"]
    real = inputs.get("attention_mask", torch.ones_like(ids)).bool()  # [B, N]
    sinks = first_token_sinks(real) if sinks is None else sinks.bool()
    rows = real & ~sinks
    maps = attention_maps(model, inputs)
    scores = torch.stack([sink_mass(maps[layer], sinks, rows) for layer in sorted(maps)])  # [L, H]
    return HeadScores(scores, method="sink", model=model_name(model), data=data,
                      params={"sinks": "first" if sinks is None else "given"})
