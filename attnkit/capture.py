"""Attention captures: the probabilities of selected query rows, computed from q and k on any backend.

Only the selected rows are computed (``[B, H_sel, R, K]`` per layer and call), so a capture of the last row costs
O(K) memory per head; ``queries="all"`` gives full maps and is the only N² case.

Example:
    >>> import attnkit, torch                                                     # doctest: +SKIP
    >>> with attnkit.attach(model, []) as h, h.capture(layers=[0, 1]) as cap:       # doctest: +SKIP
    ...     model(**inputs)
    >>> cap.maps[0][0].shape  # [B, H, 1, K] for the last query row                 # doctest: +SKIP
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class CaptureRecord:
    layer: int
    call: int  # forward index (LLM) or denoising step (diffusion)
    probs: torch.Tensor  # [B, H_sel, R, K] fp32 on CPU
    kind: str = "self"  # "self", "cross" or "joint" (diffusers)
    query_positions: torch.Tensor | None = None  # [R] row indices within the call's queries


@dataclass
class Capture:
    """Collects attention rows while active. ``maps[layer]`` is a list of ``[B, H_sel, R, K]`` tensors."""

    layers: list[int] | None
    heads: list[int] | None
    queries: object = "last"
    component: str = "text"
    records: list[CaptureRecord] = field(default_factory=list)
    active: bool = True
    _owner: object = None  # the adapter whose ``captures`` list holds this capture

    def wants(self, layer: int, component: str) -> bool:
        return self.active and component == self.component and (self.layers is None or layer in self.layers)

    def rows(self, q_len: int) -> torch.Tensor:
        """Indices of the query rows to capture among ``q_len`` queries."""
        spec = self.queries
        if spec == "last":
            return torch.tensor([q_len - 1])
        if spec == "all":
            return torch.arange(q_len)
        if isinstance(spec, slice):
            return torch.arange(q_len)[spec]
        if isinstance(spec, int):
            return torch.tensor([spec % q_len])
        idx = torch.as_tensor(list(spec), dtype=torch.long)
        return idx[(idx >= -q_len) & (idx < q_len)] % q_len

    def add(self, layer: int, call: int, probs: torch.Tensor, rows: torch.Tensor, kind: str = "self") -> None:
        if self.heads is not None:
            probs = probs[:, self.heads]
        self.records.append(CaptureRecord(layer, call, probs.detach().float().cpu(), kind, rows.cpu()))

    @property
    def maps(self) -> dict[int, list[torch.Tensor]]:
        out: dict[int, list[torch.Tensor]] = defaultdict(list)
        for rec in self.records:
            out[rec.layer].append(rec.probs)
        return dict(out)

    def last(self, layer: int) -> torch.Tensor:
        """The most recent capture of ``layer``: ``[B, H_sel, R, K]``."""
        recs = [r for r in self.records if r.layer == layer]
        if not recs:
            raise KeyError(f"nothing captured for layer {layer}; captured layers: {sorted(self.maps)}")
        return recs[-1].probs

    def stop(self) -> "Capture":
        self.active = False
        if self._owner is not None and self in self._owner.captures:
            self._owner.captures.remove(self)
        return self

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
