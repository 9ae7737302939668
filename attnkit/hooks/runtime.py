"""What both framework adapters do inside one attention call: run the site's plan on its backend (or the stock
attention when the site has no plan), count the calls, and feed active captures.

An adapter calls :func:`attend` with the call's q/k/v, the mask the model built, a ``make_ctx(entry, rows=None)``
that builds the :class:`~attnkit.interventions.base.AttentionContext` of one plan entry, and a ``stock()`` that runs
the model's own attention. Shapes: q ``[B,H,Q,D]``, k/v ``[B,Hkv,K,D]``, output ``[B,H,Q,D]``.
"""

from __future__ import annotations

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


def attend(runtime, site: Site, query, key, value, mask, *, scaling: float, causal: bool, softcap, dropout: float,
           make_ctx: Callable, stock: Callable, call_index: int) -> torch.Tensor:
    """Run ``site``'s plan (or ``stock()`` when it has none) and feed ``runtime.captures`` → ``[B,H,Q,D]``.

    ``edit_kv`` entries run first (:mod:`attnkit.hooks.kv_edit`); the backend and the captures see their result."""
    if site.entries:
        query, key, value, mask, make_ctx = apply_kv_edits(site.entries, query, key, value, mask, causal=causal,
                                                           make_ctx=make_ctx)
        out = site.backend.run(query, key, value, mask, scaling=scaling, entries=site.entries, make_ctx=make_ctx,
                               causal=causal, softcap=softcap, dropout=dropout)
        for entry in site.entries:
            entry.calls += 1
    else:
        out = stock()
    for cap in runtime.captures:
        if cap.wants(site.layer, site.component):
            capture_rows(cap, site, query, key, mask, scaling, causal, softcap, make_ctx, call_index)
    return out


def capture_rows(cap, site: Site, query, key, mask, scaling, causal, softcap, make_ctx, call_index) -> None:
    """Record the selected query rows' probabilities, with this site's edits applied: ``[B, H, R, K]``."""
    q_len, k_len = query.shape[2], key.shape[2]
    rows = cap.rows(q_len).to(query.device)
    if mask is None and causal and q_len > 1:
        mask = causal_allowed(q_len, k_len, query.device)[None, None]  # [1, 1, Q, K]
    if mask is not None and mask.shape[-2] == q_len:
        mask = mask[..., rows, :]
    probs = eager_probs(query[:, :, rows], key, mask, scaling=scaling, entries=site.entries,
                        make_ctx=lambda e: make_ctx(e, rows), causal=False, softcap=softcap)  # [B,H,R,K]
    cap.add(site.layer, call_index, probs, rows, kind=site.kind)
