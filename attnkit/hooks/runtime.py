"""What both framework adapters do inside one attention call: run the site's plan on its backend (or the stock
attention when the site has no plan), count the calls, and feed active captures.

An adapter calls :func:`attend` with the call's q/k/v, the mask the model built, a ``make_ctx(entry, rows=None)``
that builds the :class:`~attnkit.interventions.base.AttentionContext` of one plan entry, and a ``stock()`` that runs
the model's own attention. Shapes: q ``[B,H,Q,D]``, k/v ``[B,Hkv,K,D]``, output ``[B,H,Q,D]``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from attnkit.hooks.kv_edit import apply_kv_edits
from attnkit.kernels.eager import eager_probs
from attnkit.kernels.masks import causal_allowed


@dataclass
class Site:
    """One attention module of an attached model, with this attachment's plan for it."""

    qualname: str
    module: torch.nn.Module
    layer: int  # index within its component
    component: str  # "text", "vision" or "denoiser"
    num_heads: int
    num_kv_heads: int
    kind: str = "self"  # "self", "cross" or "joint"
    entries: list = field(default_factory=list)  # PlanEntry per intervention planned on this module
    backend: Any = None  # kernels.backends.Backend running the entries


class Adapter:
    """What both framework adapters share: the attachment they run, its captures, detached calls, routing.

    Subclasses set ``model``, ``sites``, ``description``, ``tracker`` and implement ``install`` / ``uninstall``."""

    handle = None  # the Handle running this attachment (None once removed)
    _detached = 0

    def describe_owner(self) -> str:
        handle = self.handle
        return f"handle {handle.name!r} on {type(self.model).__name__}" if handle is not None else "no handle"

    @contextlib.contextmanager
    def detached(self):
        """Calls inside run the stock model and are not tracked (a method's own extra pass)."""
        self._detached += 1
        try:
            yield
        finally:
            self._detached -= 1

    def routes(self, site: Site) -> bool:
        """Whether this call of ``site`` goes through attnkit (a plan or a capture) rather than the stock function."""
        handle = self.handle
        return (handle is not None and handle.active and not self._detached
                and (bool(site.entries) or any(c.wants(site.layer, site.component) for c in self.captures)))


def attend(runtime, site: Site, query, key, value, mask, *, scaling: float, causal: bool, softcap, dropout: float,
           make_ctx: Callable, stock: Callable, call_index: int) -> torch.Tensor:
    """Run ``site``'s plan (or ``stock()`` when it has none) and feed ``runtime.captures`` → ``[B,H,Q,D]``.

    Captured rows come from the computation that produced the output (the backend returns them), so every hook
    runs once per layer call, and a capture shows what the fused path really did. ``edit_kv`` entries run first
    (:mod:`attnkit.hooks.kv_edit`); the backend and the captures see their result."""
    q_len = query.shape[2]
    wanting = [cap for cap in runtime.captures if cap.wants(site.layer, site.component)]
    rows = torch.unique(torch.cat([cap.rows(q_len) for cap in wanting])).to(query.device) if wanting else None
    probs = None
    if site.entries:
        query, key, value, mask, make_ctx = apply_kv_edits(site.entries, query, key, value, mask, causal=causal,
                                                           make_ctx=make_ctx)
        result = site.backend.run(query, key, value, mask, scaling=scaling, entries=site.entries, make_ctx=make_ctx,
                                  causal=causal, softcap=softcap, dropout=dropout, rows=rows)
        out, probs = result if rows is not None else (result, None)
        for entry in site.entries:
            entry.calls += 1
    else:
        out = stock()
        if rows is not None:  # the stock attention: no hook to apply
            probs = stock_rows(query, key, mask, rows, scaling=scaling, causal=causal, softcap=softcap)
    for cap in wanting:
        mine = cap.rows(q_len).to(query.device)
        where = torch.searchsorted(rows, mine)  # positions of this capture's rows among the computed ones
        cap.add(site.layer, call_index, probs[:, :, where], mine, kind=site.kind)
    return out


def stock_rows(query, key, mask, rows, *, scaling, causal, softcap) -> torch.Tensor:
    """Probabilities ``[B,H,R,K]`` of the query rows ``rows`` under the model's own attention (no edit)."""
    if mask is not None and mask.shape[-2] == query.shape[2]:
        mask = mask[..., rows, :]
    elif mask is None and causal and query.shape[2] > 1:
        mask = causal_allowed(query.shape[2], key.shape[2], query.device)[None, None][..., rows, :]  # [1,1,R,K]
    return eager_probs(query[:, :, rows], key, mask, scaling=scaling, entries=[], make_ctx=None, causal=False,
                       softcap=softcap)
