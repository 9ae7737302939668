"""What a backend receives: the interventions planned on one layer, with their head masks.

Example:
    >>> entry = PlanEntry(intervention=None, head_mask=torch.tensor([True, False]))
    >>> entry.head_mask.tolist()
    [True, False]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PlanEntry:
    """One intervention on one layer: its target heads and its per-sequence state."""

    intervention: Any
    head_mask: torch.Tensor  # [H] bool
    state: dict = field(default_factory=dict)
    calls: int = 0

    def has(self, hook: str) -> bool:
        return hook in self.intervention.capabilities()

    def heads_on(self, device) -> torch.Tensor:
        return self.head_mask.to(device)


def select_heads(edited: torch.Tensor, original: torch.Tensor, head_mask: torch.Tensor) -> torch.Tensor:
    """Keep ``edited`` on target heads and ``original`` elsewhere; tensors are ``[B,H,...]``."""
    shape = [1, head_mask.shape[0]] + [1] * (original.dim() - 2)
    return torch.where(head_mask.view(shape), edited, original)


def restrict_bias(bias: torch.Tensor, head_mask: torch.Tensor) -> torch.Tensor:
    """A pre-softmax bias broadcastable to ``[B,H,Q,K]`` limited to the target heads (0 elsewhere, also for -inf).
    When every head is targeted the bias is returned as is, so a ``[B,1,Q,K]`` bias is not expanded per head."""
    if bool(head_mask.all()):
        return bias.float()
    return torch.where(head_mask.view(1, -1, 1, 1), bias.float(), 0.0)


def head_vector(values: torch.Tensor | float, head_mask: torch.Tensor, neutral: float) -> torch.Tensor:
    """Per-head values ``[H]`` on target heads, ``neutral`` elsewhere."""
    values = torch.as_tensor(values, dtype=torch.float32, device=head_mask.device).expand(head_mask.shape[0])
    return torch.where(head_mask, values, torch.full_like(values, neutral))
