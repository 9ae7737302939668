"""Per-head temperature (and optional length-based entropy scaling) of the pre-softmax scores.

``scores ← scores / T_h``; with ``log_length_base=n0`` additionally ``× max(1, log K / log n0)`` (a training-free
entropy correction for rows longer than ``n0`` keys, as in log-n / scalable-softmax scaling). Only a per-head
factor on the scores: runs on the torch backend (``query_scale``) without materialising attention.

Example:
    >>> import torch
    >>> iv = HeadTemperature(temperature={0: [1.0, 2.0]})
    >>> ctx = type("C", (), {"layer": 0, "num_heads": 2, "k_len": 8, "device": "cpu"})()
    >>> iv.query_scale(ctx).tolist()
    [1.0, 0.5]
"""

from __future__ import annotations

import math

import torch

from attnkit.interventions.base import Intervention, register_intervention


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

    def query_scale(self, ctx) -> torch.Tensor:  # -> [H]
        scale = 1.0 / self._temps(ctx.layer, ctx.num_heads)
        if self.log_length_base is not None:
            scale = scale * max(1.0, math.log(ctx.k_len) / math.log(self.log_length_base))
        return scale.to(ctx.device)
