"""Paired bootstrap confidence intervals for differences of aggregate metrics between two arms.

Both arms are resampled with the **same** example indices (paired), the task's aggregate is recomputed on each
resample, and the percentile interval of ``metric(arm) − metric(baseline)`` is returned. This works for
non-additive metrics (F1, perplexity, CHAIR_i) as well as means.

Example:
    >>> agg = lambda recs: {"acc": sum(r["c"] for r in recs) / len(recs)}
    >>> base = [{"c": 0}] * 50 + [{"c": 1}] * 50
    >>> arm = [{"c": 1}] * 100
    >>> d = paired_bootstrap(agg, base, arm, n_boot=200, seed=0)["acc"]
    >>> d["delta"], 0.3 < d["ci_low"] <= d["ci_high"] < 0.7
    (0.5, True)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def paired_bootstrap(aggregate: Callable[[list], dict], base: Sequence[dict], arm: Sequence[dict],
                     n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """``{metric: {delta, ci_low, ci_high}}`` for every numeric metric of ``aggregate``; records are aligned."""
    if len(base) != len(arm):
        raise ValueError(f"paired bootstrap needs aligned records: {len(base)} vs {len(arm)}.")
    if not base:
        return {}
    point_a, point_b = aggregate(list(base)), aggregate(list(arm))
    keys = [k for k, v in point_a.items() if isinstance(v, (int, float)) and isinstance(point_b.get(k), (int, float))]
    rng = np.random.default_rng(seed)
    n = len(base)
    samples = {k: [] for k in keys}
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        a = aggregate([base[i] for i in idx])
        b = aggregate([arm[i] for i in idx])
        for k in keys:
            samples[k].append(b[k] - a[k])
    out = {}
    for k in keys:
        vals = np.array([v for v in samples[k] if math.isfinite(v)])
        lo, hi = (np.quantile(vals, [alpha / 2, 1 - alpha / 2]) if len(vals) else (math.nan, math.nan))
        out[k] = {"delta": point_b[k] - point_a[k], "ci_low": float(lo), "ci_high": float(hi)}
    return out


def bootstrap_ci(aggregate: Callable[[list], dict], records: Sequence[dict], n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict:
    """``{metric: [ci_low, ci_high]}``: percentile bootstrap interval of each numeric metric of one arm.

    Example:
        >>> agg = lambda recs: {"acc": sum(r["c"] for r in recs) / len(recs)}
        >>> lo, hi = bootstrap_ci(agg, [{"c": 0}] * 50 + [{"c": 1}] * 50, n_boot=200)["acc"]
        >>> 0.35 < lo < 0.5 < hi < 0.65
        True
    """
    if not records:
        return {}
    point = aggregate(list(records))
    keys = [k for k, v in point.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    rng = np.random.default_rng(seed)
    n = len(records)
    samples = {k: [] for k in keys}
    for _ in range(n_boot):
        res = aggregate([records[i] for i in rng.integers(0, n, size=n)])
        for k in keys:
            samples[k].append(res[k])
    out = {}
    for k in keys:
        vals = np.array([v for v in samples[k] if math.isfinite(v)])
        lo, hi = (np.quantile(vals, [alpha / 2, 1 - alpha / 2]) if len(vals) else (math.nan, math.nan))
        out[k] = [float(lo), float(hi)]
    return out
