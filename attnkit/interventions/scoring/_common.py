"""Helpers shared by the scorers: run a model once and collect attention rows or per-head outputs."""

from __future__ import annotations

import torch


def attention_maps(model, inputs: dict, queries="all", backend: str = "eager") -> dict[int, torch.Tensor]:
    """``{layer: probs [B, H, R, K]}`` of the stock model for one forward (R = selected query rows)."""
    import attnkit

    with attnkit.attach(model, [], backend=backend) as handle, handle.capture(queries=queries) as cap, \
            torch.no_grad():
        model(**inputs)
    return {layer: cap.last(layer) for layer in sorted(cap.maps)}


def stack_layers(per_layer: dict[int, torch.Tensor]) -> torch.Tensor:
    """``{layer: [H]}`` → ``[L, H]``."""
    return torch.stack([per_layer[layer] for layer in sorted(per_layer)])


def model_name(model) -> str:
    config = model.config
    return getattr(config, "_name_or_path", "") or getattr(config, "model_type", "")


def row_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over batch and selected query rows. values [B, H, Q], rows [B, Q] bool → [H]."""
    w = rows[:, None, :].float()  # [B, 1, Q]
    return (values * w).sum((0, 2)) / w.sum((0, 2)).clamp_min(1)
