"""Attention heat maps: full [Q, K] maps or captured rows, one panel per head (and per layer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import FigureBase

from ._common import (
    as_array,
    check_finite_nonempty,
    check_labels,
    check_ndim,
    grid_dims,
    new_figure,
    set_token_ticks,
    value_range,
)

_SHAPES = {2: "[Q, K]", 3: "[H, Q, K]", 4: "[L, H, Q, K]"}


@dataclass
class _Panel:
    data: np.ndarray  # [R, K]: R query rows, or R heads when a single captured row is stacked
    title: str | None
    row_labels: list[str] | None  # None: rows are queries, labelled with query_tokens


def attention_heatmap(
    probs: Any,
    tokens: Sequence[str] | None = None,
    query_tokens: Sequence[str] | None = None,
    title: str | None = None,
    *,
    head_ids: Sequence[int] | None = None,
    layer_ids: Sequence[int] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    cmap: str = "viridis",
    max_cols: int = 4,
    max_ticks: int = 40,
    max_label_len: int = 12,
    fig: FigureBase | None = None,
) -> FigureBase:
    """Heat maps of attention probabilities with token labels; returns the Figure.

    Args:
        probs: ``[Q, K]`` one map, ``[H, Q, K]`` a grid of heads, or ``[L, H, Q, K]`` layers (rows) × heads
            (columns). When ``Q == 1`` (a single captured query row) the heads are stacked as the rows of one
            panel per layer instead, which reads much better than H one-pixel-high strips.
        tokens: K key labels (x axis). Long labels are truncated, and only about ``max_ticks`` are drawn.
        query_tokens: Q query labels (y axis). Defaults to ``tokens`` when ``Q == K``, else row indices.
        title: figure title.
        head_ids, layer_ids: the model's indices for the H / L entries (for titles), default ``0..H-1``.
        vmin, vmax: colour limits shared by every panel (default ``0`` and the maximum).
        log: logarithmic colour scale (useful when a sink token takes most of the mass).
        fig: draw into this Figure / SubFigure instead of a new one.

    Example:
        >>> import torch
        >>> from attnkit.viz import attention_heatmap
        >>> probs = torch.softmax(torch.randn(2, 4, 4), dim=-1)  # [H, Q, K]
        >>> fig = attention_heatmap(probs, tokens=["<s>", "The", "cat", "sat"], title="layer 3")
        >>> len(fig.axes)  # two heads and a colour bar
        3
    """
    arr = as_array(probs, "probs")
    check_ndim(arr, "probs", _SHAPES)
    check_finite_nonempty(arr, "probs")
    n_q, n_k = arr.shape[-2], arr.shape[-1]
    keys = check_labels(tokens, n_k, "tokens", f"the key axis of probs (shape {list(arr.shape)})")
    if query_tokens is None and keys is not None and n_q == n_k:
        query_tokens = keys
    queries = check_labels(query_tokens, n_q, "query_tokens", f"the query axis of probs (shape {list(arr.shape)})")

    panels = _panels(arr, head_ids, layer_ids)
    nrows, ncols = _layout(arr, len(panels), max_cols)
    n_rows_panel = panels[0].data.shape[0]
    panel_w = float(np.clip(0.16 * min(n_k, max_ticks) + 1.4, 2.6, 6.0))
    panel_h = float(np.clip(0.16 * min(n_rows_panel, max_ticks) + 1.4, 1.6, 6.0))
    fig = new_figure(fig, (ncols * panel_w + 1.2, nrows * panel_h + (0.5 if title else 0.1)))

    lo, hi = value_range(arr, vmin, vmax, floor=None if log else 0.0)
    norm = LogNorm(vmin=max(lo, max(hi, 1e-12) * 1e-4), vmax=hi) if log else Normalize(vmin=lo, vmax=hi)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#dddddd")

    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_visible(False)
            continue
        panel = panels[i]
        image = ax.imshow(panel.data, aspect="auto", interpolation="nearest", cmap=colormap, norm=norm)
        if panel.title:
            ax.set_title(panel.title, fontsize=9)
        set_token_ticks(ax, "x", keys, n_k, max_ticks, max_label_len)
        row_labels = panel.row_labels if panel.row_labels is not None else queries
        set_token_ticks(ax, "y", row_labels, panel.data.shape[0], max_ticks, max_label_len)
        _hide_inner_labels(ax, i, len(panels), ncols)
    for ax in list(axes.flat)[len(panels):]:
        fig.delaxes(ax)
    fig.colorbar(image, ax=list(axes.flat[: len(panels)]), label="attention", shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig


def _panels(arr: np.ndarray, head_ids, layer_ids) -> list[_Panel]:
    """Split ``arr`` into 2-D panels with titles (see attention_heatmap for the shapes)."""
    if arr.ndim == 2:
        return [_Panel(arr, None, None)]
    n_heads = arr.shape[-3]
    heads = _ids(head_ids, n_heads, "head_ids", "H")
    stack = arr.shape[-2] == 1  # one captured row per head: heads become the rows of one panel
    if arr.ndim == 3:
        if stack:
            return [_Panel(arr[:, 0, :], None, [f"head {h}" for h in heads])]
        return [_Panel(arr[h], f"head {heads[h]}", None) for h in range(n_heads)]
    layers = _ids(layer_ids, arr.shape[0], "layer_ids", "L")
    if stack:
        return [_Panel(arr[l, :, 0, :], f"layer {layers[l]}", [f"head {h}" for h in heads]) for l in range(arr.shape[0])]
    return [
        _Panel(arr[l, h], f"layer {layers[l]} · head {heads[h]}", None)
        for l in range(arr.shape[0])
        for h in range(n_heads)
    ]


def _ids(ids, n: int, name: str, dim: str) -> list:
    if ids is None:
        return list(range(n))
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"{name} has {len(ids)} entries but probs has {dim}={n}")
    return ids


def _layout(arr: np.ndarray, n_panels: int, max_cols: int) -> tuple[int, int]:
    """Layers × heads grids keep one layer per row; everything else is near-square."""
    if arr.ndim == 4 and arr.shape[-2] != 1:
        return arr.shape[0], arr.shape[1]
    return grid_dims(n_panels, max_cols)


def _hide_inner_labels(ax, index: int, n_panels: int, ncols: int) -> None:
    """Keep tick labels only on the outer edge of the grid (all panels share both axes)."""
    if index + ncols < n_panels:  # another panel sits below this one
        ax.tick_params(labelbottom=False)
    if index % ncols != 0:
        ax.tick_params(labelleft=False)
