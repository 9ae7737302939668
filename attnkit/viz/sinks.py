"""Sink view: how much attention each layer puts on the first token and on other sink tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import FigureBase

from ._common import as_array, check_finite_nonempty, check_labels, check_ndim, new_figure, shape_str

_SPREADS = ("range", "std", "none")
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def sink_view(
    first_token_mass: Any,
    other_sink_mass: Any = None,
    title: str | None = None,
    *,
    spread: str = "range",
    kind: str = "line",
    layer_labels: Sequence[Any] | None = None,
    ylim: tuple[float, float] | None = None,
    fig: FigureBase | None = None,
) -> FigureBase:
    """Attention mass on the first token (and other sink tokens) per layer; returns the Figure.

    Args:
        first_token_mass: ``[L]`` mass per layer, or ``[L, H]`` per head: drawn as the mean over heads with the
            spread over heads shaded (line) or as error bars (bar).
        other_sink_mass: the same for other sink tokens: one ``[L]`` / ``[L, H]`` array, or a mapping
            ``{label: array}`` for several groups (e.g. ``{"'.'": m1, "'\\n'": m2}``).
        title: axes title.
        spread: for ``[L, H]`` input, ``"range"`` (min–max over heads), ``"std"`` (mean ± one standard deviation)
            or ``"none"``.
        kind: ``"line"`` or ``"bar"`` (grouped bars per layer).
        layer_labels: x tick labels for the L layers (default indices).
        ylim: y limits (default from 0 to a little above the largest value, at most 1.02 for fractions).
        fig: draw into this Figure / SubFigure instead of a new one.

    Example:
        >>> import torch
        >>> from attnkit.viz import sink_view
        >>> fig = sink_view(torch.rand(6, 4), other_sink_mass=torch.rand(6) * 0.1, title="SmolLM2")
        >>> [line.get_label() for line in fig.axes[0].lines]
        ['first token', 'other sinks']
    """
    if spread not in _SPREADS:
        raise ValueError(f"spread must be one of {_SPREADS} (got {spread!r})")
    if kind not in ("line", "bar"):
        raise ValueError(f"kind must be 'line' or 'bar' (got {kind!r})")
    series = _series(first_token_mass, other_sink_mass)
    n_layers = series[0][1].shape[0]
    labels = check_labels(layer_labels, n_layers, "layer_labels", "the layer axis of first_token_mass")

    fig = new_figure(fig, (float(np.clip(4.5 + 0.22 * n_layers, 7.0, 14.0)), 3.6))
    ax = fig.add_subplot()
    x = np.arange(n_layers)
    width = 0.8 / len(series)
    for i, (name, arr) in enumerate(series):
        mean, low, high, spread_label = _summary(arr, spread)
        color = _COLORS[i % len(_COLORS)]
        if kind == "line":
            ax.plot(x, mean, marker="o", markersize=3, color=color, label=name)
            if low is not None:
                ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0, label=f"{name}: {spread_label}")
        else:
            offset = (i - (len(series) - 1) / 2) * width
            err = None if low is None else np.vstack([mean - low, high - mean])
            bar_label = name if low is None else f"{name} (whiskers: {spread_label})"
            ax.bar(x + offset, mean, width, yerr=err, color=color, label=bar_label, capsize=2, error_kw={"lw": 0.8})

    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass")
    ax.set_xlim(-0.6, n_layers - 0.4)
    step = max(1, int(np.ceil(n_layers / 30)))
    ticks = list(range(0, n_layers, step))
    ax.set_xticks(ticks, [labels[t] for t in ticks] if labels else [str(t) for t in ticks])
    ax.set_ylim(ylim if ylim is not None else _default_ylim(series))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        ax.set_title(title)
    return fig


def _series(first: Any, others: Any) -> list[tuple[str, np.ndarray]]:
    """Validate inputs into ``[(label, [L] or [L, H] array), ...]`` with the first token first."""
    first_arr = _mass(first, "first_token_mass")
    series = [("first token", first_arr)]
    if others is None:
        return series
    named = others.items() if isinstance(others, Mapping) else [("other sinks", others)]
    for label, value in named:
        name = "other_sink_mass" if not isinstance(others, Mapping) else f"other_sink_mass[{label!r}]"
        arr = _mass(value, name)
        if arr.shape[0] != first_arr.shape[0]:
            raise ValueError(
                f"{name} has shape {shape_str(arr.shape)} but first_token_mass has shape "
                f"{shape_str(first_arr.shape)}: both need the same number of layers L"
            )
        series.append((str(label), arr))
    return series


def _mass(value: Any, name: str) -> np.ndarray:
    arr = as_array(value, name)
    check_ndim(arr, name, {1: "[L]", 2: "[L, H]"})
    check_finite_nonempty(arr, name)
    return arr


def _summary(arr: np.ndarray, spread: str):
    """Mean per layer, the band (low, high) over heads or None, and the band's legend label."""
    if arr.ndim == 1:
        return arr, None, None, ""
    mean = np.nanmean(arr, axis=1)
    if spread == "range":
        return mean, np.nanmin(arr, axis=1), np.nanmax(arr, axis=1), "min–max over heads"
    if spread == "std":
        std = np.nanstd(arr, axis=1)
        return mean, mean - std, mean + std, "± 1 std over heads"
    return mean, None, None, ""


def _default_ylim(series) -> tuple[float, float]:
    top = max(float(np.nanmax(arr)) for _, arr in series)
    if top <= 0:
        return 0.0, 1.0
    return 0.0, min(1.02, top * 1.1) if top <= 1.0 else top * 1.05
