"""MoA-style per-head attention spans (after "MoA: Mixture of Sparse Attention", Fu et al., arXiv 2406.14909):
every head keeps its own sliding window, elastic in the sequence length, plus a few initial (sink) tokens.

Rule: head ``h`` of layer ``l`` attends to the first ``sinks`` real tokens and to the keys within its span
``S_{l,h}(N) = α_{l,h} + β_{l,h}·N`` of the query (``N`` = tokens cached, the current one included; key ``j`` visible
to query ``i`` iff ``i − j < S``), at the original positions, so a ``−∞`` key mask is exact. MoA profiles the spans
per head by gradient-based sensitivity on long-context data; that profiler is not reimplemented: give the spans
(``spans={layer: [(α, β) per head]}``, or fixed ``windows={layer: [w per head]}``), or derive them from any head
score with :func:`spans_from_scores` (higher score = longer span, mean span = the budget). Heads not listed attend
fully. ``prefill=False`` (default) restricts decode steps only (what the cache must keep); ``prefill=True`` also
masks prefill rows — a per-head ``[B, H, Q, K]`` bias, O(H·Q·K) memory, as MoA's prefill kernel is not simulated
without it. :attr:`MoA.account` counts the keys each restricted call attends.

Example (two heads of layer 0 with windows 2 and 4, one sink):
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> moa = MoA(windows={0: [2, 4, None, None]}, sinks=1)
    >>> with attnkit.attach(tiny_causal_lm("llama"), [moa]) as handle:
    ...     _ = handle.model.generate(torch.tensor([[1, 5, 7, 9, 11, 13]]), max_new_tokens=2, do_sample=False)
    >>> moa.account.summary()["per_layer"][0]        # (1 + 2) and (1 + 4) of 7 keys
    0.5714285714285714
"""

from __future__ import annotations

import math

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.kvcache._sparse import KeyAccount, check_int, keep_bias, real_keys, visible
from attnkit.scores import HeadScores
from attnkit.targets import Target


def span_keep(real: torch.Tensor, q_len: int, spans: torch.Tensor, sinks: int) -> torch.Tensor:
    """Bool ``[B, H, Q, K]``: sink or ``i − j < span`` (spans ``[H]`` or per sample ``[B, H]``, fp, ``inf`` = full;
    queries are the last ``Q`` keys; causality and padding are the model's mask).

    Example:
        >>> span_keep(torch.ones(1, 5, dtype=torch.bool), 1, torch.tensor([2.0, float("inf")]), 1)[0, :, 0].int().tolist()
        [[1, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    """
    K = real.shape[1]
    dist = (torch.arange(K - q_len, K, device=real.device)[:, None] - torch.arange(K, device=real.device)[None])
    spans = spans.to(real.device).float()
    spans = spans[None] if spans.dim() == 1 else spans  # [B|1, H]
    near = dist[None, None].float() < spans[:, :, None, None]  # [B|1, H, Q, K]
    sink = real & (real.long().cumsum(-1) <= sinks)  # [B, K]
    return near | sink[:, None, None, :]


def spans_from_scores(scores: HeadScores, budget: float, min_span: float = 16.0, sinks: int = 0) -> dict:
    """Per-head fixed windows proportional to ``scores`` (clamped at 0), rescaled so their mean is ``budget``
    (each at least ``min_span``) → ``{layer: [w per head]}`` for :class:`MoA` ``windows``."""
    s = scores.scores.clamp_min(0).float()
    weights = s / s.mean().clamp_min(1e-12)
    windows = (weights * budget).clamp_min(min_span)
    windows = windows * (budget / windows.mean())  # keep the mean at the budget after clamping
    return {layer: [float(w) for w in windows[layer]] for layer in range(windows.shape[0])}


@register_intervention
class MoA(Intervention):
    name = "moa"
    description = "MoA-style heterogeneous per-head sliding windows (elastic in the length) with sink tokens"
    requires = frozenset({"text_decoder"})
    conformance = {"neutral": {"windows": {0: [100_000]}}, "active": {"windows": {0: [1, 2]}, "sinks": 1,
                                                                      "prefill": True},
                   "not_applicable": {"generate": "windows measured from each call's cache: a recomputed prefill "
                                                  "and decode steps see different lengths N"}}

    def __init__(self, spans: dict | None = None, windows: dict | None = None, sinks: int = 64,
                 prefill: bool = False, **target):
        if (spans is None) == (windows is None):
            raise ValueError("moa: give exactly one of spans={layer: [(alpha, beta), ...]} or "
                             "windows={layer: [w, ...]}")
        if target.get("layers") is not None or target.get("heads") is not None:
            raise ValueError("moa: the layers and heads are the keys of spans/windows; do not pass layers/heads")
        super().__init__(**target)
        self.spans, self.windows = spans, windows
        self.sinks = check_int(self.name, "sinks", sinks)
        self.prefill = bool(prefill)
        self.account = KeyAccount()
        self._rules: dict[int, list] = {}

    def setup(self, model) -> None:
        text = model.component("text")
        given = self.spans if self.spans is not None else self.windows
        rules: dict[int, list] = {}
        for layer, per_head in given.items():
            layer = int(layer)
            if not 0 <= layer < text.num_layers:
                raise ValueError(f"moa: layer {layer} does not exist (the model has {text.num_layers})")
            if len(per_head) > text.num_heads:
                raise ValueError(f"moa: layer {layer} lists {len(per_head)} heads but has {text.num_heads}")
            rule = []
            for value in list(per_head) + [None] * (text.num_heads - len(per_head)):
                if value is None:
                    rule.append(None)
                elif self.spans is not None:
                    alpha, beta = value
                    rule.append((float(alpha), float(beta)))
                else:
                    rule.append((float(value), 0.0))
            rules[layer] = rule
        self._rules = rules
        heads = {layer: [h for h, r in enumerate(rule) if r is not None] for layer, rule in rules.items()}
        heads = {layer: hs for layer, hs in heads.items() if hs}
        if not heads:
            raise ValueError("moa: no head has a span; nothing to restrict")
        self.target = Target(layers=sorted(heads), heads=heads, modules=self.target.modules)

    def span_values(self, layer: int, n: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` spans of ``layer`` for ``n [B]`` real tokens cached (``inf`` for heads attending fully)."""
        rules = self._rules[layer]
        alpha = torch.tensor([math.inf if r is None else r[0] for r in rules])  # [H]
        beta = torch.tensor([0.0 if r is None else r[1] for r in rules])
        return (alpha[None] + beta[None] * n.float().cpu()[:, None]).clamp_min(1.0)  # [B, H]

    def score_bias(self, ctx):
        if ctx.is_prefill and not self.prefill:
            return None
        real = real_keys(ctx)  # [B, K]
        keep = span_keep(real, ctx.q_len, self.span_values(ctx.layer, real.sum(-1)), self.sinks)  # [B, H, Q, K]
        if not ctx.is_prefill:
            self.account.add(ctx.layer, keep, visible(ctx), ctx.heads,
                             ctx.query_mask("real") if ctx.tracker is not None else None)
        return keep_bias(keep)
