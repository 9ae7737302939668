"""Layers × heads grids of per-head scores (retrieval, sink, visual … heads), with the top-k marked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import FigureBase
from matplotlib.patches import Rectangle

from ._common import as_array, check_finite_nonempty, check_labels, check_ndim, new_figure, set_token_ticks, value_range

_MARK = "#00e5ff"  # top-k outline: cyan stands out on magma/viridis/greys


def head_score_grid(
    scores: Any,
    title: str | None = None,
    *,
    top_k: int | None = None,
    largest: bool = True,
    annotate: bool | None = None,
    layer_labels: Sequence[Any] | None = None,
    head_labels: Sequence[Any] | None = None,
    label: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "magma",
    fig: FigureBase | None = None,
) -> FigureBase:
    """Heat map of a ``[L, H]`` score per (layer, head), optionally outlining the ``top_k`` heads; returns the Figure.

    Args:
        scores: a ``[L, H]`` tensor/array, or any object with a ``.scores`` ``[L, H]`` attribute and optionally a
            ``.method`` string (e.g. attnkit's ``HeadScores``): the method names the colour bar and default title.
            NaN entries (heads not scored) are drawn grey.
        top_k: outline the k best heads and write their rank (1 = best) in the cell.
        largest: whether larger scores are better when choosing the top k.
        annotate: write every value in its cell (default: only when the grid has at most 64 cells).
        layer_labels, head_labels: tick labels for the L rows / H columns (default indices).
        label: colour-bar label (default the method name, else "score").
        vmin, vmax: colour limits (default the data range).
        fig: draw into this Figure / SubFigure instead of a new one.

    Example:
        >>> import torch
        >>> from attnkit.viz import head_score_grid
        >>> fig = head_score_grid(torch.rand(4, 3), top_k=2, title="retrieval heads")
        >>> fig.axes[0].get_ylabel(), len(fig.axes[0].patches)
        ('layer', 2)
    """
    method = getattr(scores, "method", None) if hasattr(scores, "scores") else None
    data = scores.scores if hasattr(scores, "scores") else scores
    arr = as_array(data, "scores.scores" if hasattr(scores, "scores") else "scores")
    check_ndim(arr, "scores", {2: "[L, H] (layers × heads)"})
    check_finite_nonempty(arr, "scores")
    n_layers, n_heads = arr.shape
    rows = check_labels(layer_labels, n_layers, "layer_labels", "the layer axis of scores")
    cols = check_labels(head_labels, n_heads, "head_labels", "the head axis of scores")
    if title is None and method:
        title = f"head scores: {method}"

    fig = new_figure(fig, (min(1.0 + 0.45 * n_heads, 14.0) + 1.3, min(0.8 + 0.26 * n_layers, 11.0) + 0.4))
    ax = fig.add_subplot()
    lo, hi = value_range(arr, vmin, vmax)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#cccccc")
    image = ax.imshow(np.ma.masked_invalid(arr), aspect="auto", interpolation="nearest", cmap=colormap,
                      norm=Normalize(lo, hi))
    set_token_ticks(ax, "x", cols, n_heads, 32, 8)
    set_token_ticks(ax, "y", rows, n_layers, 40, 10)
    ax.tick_params(axis="x", labelrotation=0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if annotate or (annotate is None and arr.size <= 64):
        _annotate_values(ax, arr, image)
    if top_k:
        _mark_top_k(ax, arr, top_k, largest)
    fig.colorbar(image, ax=ax, label=label or method or "score")
    if title:
        ax.set_title(title)
    return fig


def top_k_heads(arr: np.ndarray, k: int, largest: bool = True) -> list[tuple[int, int]]:
    """The ``k`` best (layer, head) pairs of a ``[L, H]`` array, best first; NaNs are never chosen.

    Example:
        >>> import numpy as np
        >>> top_k_heads(np.array([[0.1, 0.9], [0.5, 0.2]]), 2)
        [(0, 1), (1, 0)]
    """
    flat = np.asarray(arr, dtype=np.float64).ravel()
    valid = np.flatnonzero(np.isfinite(flat))
    order = valid[np.argsort(-flat[valid] if largest else flat[valid], kind="stable")]
    n_heads = arr.shape[1]
    return [(int(i // n_heads), int(i % n_heads)) for i in order[: max(0, int(k))]]


def _mark_top_k(ax, arr: np.ndarray, k: int, largest: bool) -> None:
    for rank, (layer, head) in enumerate(top_k_heads(arr, k, largest), start=1):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor=_MARK, linewidth=2))
        ax.text(head + 0.45, layer - 0.45, str(rank), ha="right", va="top", fontsize=6.5, color="black",
                fontweight="bold", bbox={"boxstyle": "square,pad=0.12", "facecolor": _MARK, "linewidth": 0})


def _annotate_values(ax, arr: np.ndarray, image) -> None:
    """Write each finite value in its cell, dark on light cells and light on dark ones."""
    for (layer, head), value in np.ndenumerate(arr):
        if not np.isfinite(value):
            continue
        r, g, b, _ = image.cmap(image.norm(value))
        color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(head, layer, f"{value:.2g}", ha="center", va="center", fontsize=7, color=color)
