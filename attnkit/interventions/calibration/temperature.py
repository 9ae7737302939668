"""Per-head temperature (and optional length-based entropy scaling) of the pre-softmax scores.

``scores ← scores / T_h``; with ``log_length_base=n0`` each query row is additionally scaled by
``max(1, log n_i / log n0)`` where ``n_i`` is the number of keys *that row* may attend under the model's mask (real,
unpadded keys; causality, sliding windows and bidirectional blocks included) — a training-free entropy correction
for rows longer than ``n0`` keys, as in log-n / scalable-softmax scaling. Because the factor depends only on the
row's own visible keys, it is the same batched or alone (whatever the padding), in a KV-cache decode step or a full
recomputation, and a position's factor never depends on the tokens that follow it.

Only a factor on the scores (``query_scale``, per head or per row): runs on the torch backend without
materialising attention.

Example:
    >>> import torch
    >>> iv = HeadTemperature(temperature={0: [1.0, 2.0]})
    >>> ctx = type("C", (), {"layer": 0, "num_heads": 2, "device": "cpu"})()
    >>> iv.query_scale(ctx).tolist()
    [1.0, 0.5]
    >>> log_n = HeadTemperature(log_length_base=4)
    >>> ctx.visible_keys = lambda: torch.tensor([[[1.0, 4.0, 16.0]]])     # [B, 1, Q]: keys each row may see
    >>> log_n.query_scale(ctx)[0, :, :, 0].tolist()                      # [B, H, Q, 1]: max(1, log n / log 4)
    [[1.0, 1.0, 2.0], [1.0, 1.0, 2.0]]
"""

from __future__ import annotations

import math

import torch

from attnkit.interventions.base import Intervention, register_intervention


def log_length_factor(visible: torch.Tensor, base: int) -> torch.Tensor:
    """``max(1, log n / log base)`` per row from the visible-key counts ``n`` (any shape; 0 or 1 keys → 1).

    Example:
        >>> log_length_factor(torch.tensor([0.0, 1.0, 512.0, 1024.0]), 512).tolist()
        [1.0, 1.0, 1.0, 1.1111111640930176]
    """
    n = visible.float().clamp_min(1.0)
    return torch.clamp_min(torch.log(n) / math.log(base), 1.0)


@register_intervention
class HeadTemperature(Intervention):
    name = "head-temperature"
    conformance = {"neutral": {"temperature": 1.0}, "active": {"temperature": 0.8, "log_length_base": 4}}
    requires = frozenset({"text_decoder"})
    description = "divide each target head's attention scores by a temperature"

    def __init__(self, temperature: float | list | dict = 1.0, log_length_base: int | None = None, **target):
        super().__init__(**target)
        values = temperature.values() if isinstance(temperature, dict) else [temperature]
        flat = [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v])]
        if not flat or any(isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0 for t in flat):
            raise ValueError(f"head-temperature: temperatures must be positive numbers, got {temperature!r}")
        if log_length_base is not None and log_length_base < 2:
            raise ValueError("head-temperature: log_length_base must be ≥ 2")
        self.temperature, self.log_length_base = temperature, log_length_base

    def _temps(self, layer: int, num_heads: int) -> torch.Tensor:  # [H]
        t = self.temperature
        if isinstance(t, dict):
            t = t.get(layer, t.get(str(layer), 1.0))
        vec = torch.as_tensor(t, dtype=torch.float32).flatten()
        if vec.numel() not in (1, num_heads):
            raise ValueError(f"head-temperature: layer {layer} has {num_heads} heads but {vec.numel()} temperatures")
        return vec.expand(num_heads)

    def query_scale(self, ctx) -> torch.Tensor:  # -> [H], or [B, H, Q, 1] with log-length scaling
        scale = (1.0 / self._temps(ctx.layer, ctx.num_heads)).to(ctx.device)  # [H]
        if self.log_length_base is None:
            return scale
        factor = log_length_factor(ctx.visible_keys().to(ctx.device), self.log_length_base)  # [B|1, H|1, Q]
        return scale.view(1, -1, 1, 1) * factor.unsqueeze(-1)  # [B|1, H, Q, 1]
