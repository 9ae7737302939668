"""What a backend receives: the interventions planned on one layer, with their head masks.

Example:
    >>> entry = PlanEntry(intervention=None, head_mask=torch.tensor([True, False]))
    >>> entry.head_mask.tolist()
    [True, False]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch


@dataclass
class PlanEntry:
    """One intervention on one layer: its target heads and its per-sequence state."""

    intervention: Any
    head_mask: torch.Tensor  # [H] bool
    state: dict = field(default_factory=dict)
    calls: int = 0

    @cached_property
    def caps(self) -> frozenset:
        """The intervention's hooks, read once (backends ask on every attention call)."""
        return frozenset(self.intervention.capabilities())

    @cached_property
    def all_heads(self) -> bool:
        """Whether every head is targeted (then head selection is skipped)."""
        return bool(self.head_mask.all())

    def has(self, hook: str) -> bool:
        return hook in self.caps

    def heads_on(self, device) -> torch.Tensor:
        return self.head_mask.to(device)


def entry_caps(entry) -> frozenset | set:
    """An entry's hooks: cached on a :class:`PlanEntry`, asked each time of a stand-in entry (tests).

    Example:
        >>> from types import SimpleNamespace
        >>> iv = SimpleNamespace(capabilities=lambda: {"edit_output"})
        >>> entry_caps(PlanEntry(iv, torch.tensor([True]))), entry_caps(SimpleNamespace(intervention=iv))
        (frozenset({'edit_output'}), {'edit_output'})
    """
    caps = getattr(entry, "caps", None)
    return caps if caps is not None else entry.intervention.capabilities()


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


def query_factors(values: torch.Tensor | float, head_mask: torch.Tensor) -> torch.Tensor:
    """A ``query_scale`` result — per head ``[H]`` or per row, broadcastable to ``[B,H,Q,1]`` — as a 4-D factor
    ``[B|1, H, Q|1, 1]`` (fp32) that is 1 on heads outside ``head_mask``.

    Example:
        >>> query_factors(torch.tensor([2.0, 3.0]), torch.tensor([True, False])).flatten().tolist()
        [2.0, 1.0]
        >>> query_factors(torch.tensor([[1.5], [2.5]]).view(1, 1, 2, 1), torch.tensor([True, False])).shape
        torch.Size([1, 2, 2, 1])
    """
    values = torch.as_tensor(values, dtype=torch.float32, device=head_mask.device)
    num_heads = head_mask.shape[0]
    if values.dim() <= 1:
        values = values.expand(num_heads).view(1, num_heads, 1, 1)  # [1, H, 1, 1]
    elif values.dim() != 4 or values.shape[-1] != 1 or values.shape[1] not in (1, num_heads):
        raise ValueError(f"query_scale must return [H] or a tensor broadcastable to [B,H,Q,1], got {tuple(values.shape)}")
    values = values.float()
    if bool(head_mask.all()):
        return values
    return torch.where(head_mask.view(1, -1, 1, 1), values, torch.ones((), device=values.device))  # [B|1,H,Q|1,1]

