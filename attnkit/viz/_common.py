"""Shared helpers for attnkit.viz: input conversion, shape errors, figure creation, tick labels.

Every public plotting function in :mod:`attnkit.viz` takes plain tensors / arrays, draws into a fresh
:class:`matplotlib.figure.Figure` (or into the ``fig`` it is given, which may be a ``SubFigure``) and returns it.
Figures are created without pyplot, so nothing is registered globally and nothing needs closing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure, FigureBase

# Attribute under which a function records the size it would have chosen when drawing into a given SubFigure;
# before_after() reads it to size the parent figure.
PREFERRED_SIZE_ATTR = "_attnkit_preferred_size"


def as_array(x: Any, name: str) -> np.ndarray:
    """Return ``x`` (torch tensor, numpy array, nested list) as a float64 numpy array.

    Tensors are detached and moved to CPU; bf16/fp16 are upcast. ``name`` is used in error messages.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a tensor or array of numbers (got {type(x).__name__})") from exc
    return arr


def shape_str(shape: Sequence[int]) -> str:
    """Format a shape the way the docs write them: ``[2, 3, 4]``."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_ndim(arr: np.ndarray, name: str, allowed: dict[int, str]) -> None:
    """Raise a ValueError naming ``name``, the shape got and the shapes accepted unless ``arr.ndim`` is allowed.

    ``allowed`` maps ndim to a description, e.g. ``{2: "[Q, K]", 3: "[H, Q, K]"}``.
    """
    if arr.ndim not in allowed:
        expected = " or ".join(allowed.values())
        raise ValueError(f"{name} must have shape {expected} (got shape {shape_str(arr.shape)})")


def check_finite_nonempty(arr: np.ndarray, name: str) -> None:
    """Reject empty arrays (nothing to draw) with an error naming the argument."""
    if arr.size == 0:
        raise ValueError(f"{name} is empty (got shape {shape_str(arr.shape)})")


def truncate_label(label: Any, max_len: int) -> str:
    """Shorten ``label`` to at most ``max_len`` characters, marking the cut with an ellipsis."""
    text = str(label)
    if max_len < 1 or len(text) <= max_len:
        return text
    return text[: max_len - 1] + "\u2026"


def tick_positions(n: int, max_ticks: int) -> list[int]:
    """Indices to label out of ``n`` so that at most about ``max_ticks`` labels are drawn (every k-th)."""
    if n <= 0:
        return []
    step = max(1, math.ceil(n / max(1, max_ticks)))
    return list(range(0, n, step))


def set_token_ticks(ax, axis: str, labels: Sequence[Any] | None, n: int, max_ticks: int, max_len: int) -> None:
    """Label ``axis`` ("x" or "y") of ``ax`` with (thinned, truncated) ``labels``, or indices when None."""
    positions = tick_positions(n, max_ticks)
    texts = [truncate_label(labels[i], max_len) if labels is not None else str(i) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, texts, rotation=90 if labels is not None else 0, fontsize=_tick_fontsize(len(positions)))
    else:
        ax.set_yticks(positions, texts, fontsize=_tick_fontsize(len(positions)))


def _tick_fontsize(n_labels: int) -> float:
    return 8.0 if n_labels <= 24 else 6.5


def check_labels(labels: Sequence[Any] | None, n: int, name: str, what: str) -> list[str] | None:
    """Check that ``labels`` has ``n`` entries (``what`` describes the axis they label) and return them as str."""
    if labels is None:
        return None
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels but {what} has {n} entries")
    return [str(t) for t in labels]


def grid_dims(n: int, max_cols: int) -> tuple[int, int]:
    """Rows and columns for ``n`` panels, near-square, at most ``max_cols`` columns."""
    ncols = max(1, min(n, max_cols, math.ceil(math.sqrt(n))))
    if n > ncols * ncols:  # wide grids read better than tall ones
        ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    return nrows, ncols


def new_figure(fig: FigureBase | None, figsize: tuple[float, float]) -> FigureBase:
    """Return ``fig`` if given (remembering ``figsize`` as its preferred size) else a new constrained Figure."""
    if fig is None:
        return Figure(figsize=figsize, layout="constrained")
    if not isinstance(fig, FigureBase):
        raise TypeError(f"fig must be a matplotlib Figure or SubFigure (got {type(fig).__name__})")
    setattr(fig, PREFERRED_SIZE_ATTR, tuple(float(v) for v in figsize))
    return fig


def value_range(arr: np.ndarray, vmin: float | None, vmax: float | None, floor: float | None = None) -> tuple[float, float]:
    """Colour limits: explicit values win, else the finite data range (``floor`` replaces the data minimum)."""
    finite = arr[np.isfinite(arr)]
    lo = floor if floor is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(finite.max()) if finite.size else 1.0
    lo = lo if vmin is None else float(vmin)
    hi = hi if vmax is None else float(vmax)
    if hi <= lo:  # a constant map still needs a non-degenerate scale
        hi = lo + max(abs(lo) * 1e-6, 1e-12)
    return lo, hi


def opaque_colorbar(fig: FigureBase, mappable, ax, **kwargs):
    """Colour bar for a semi-transparent overlay, drawn opaque so its colours can be read.

    It follows ``mappable``'s norm object, so later ``mappable.set_clim`` calls update it too.
    """
    proxy = ScalarMappable(norm=mappable.norm, cmap=mappable.get_cmap())
    return fig.colorbar(proxy, ax=ax, **kwargs)


def is_colorbar_axes(ax) -> bool:
    """Whether ``ax`` holds a colour bar (matplotlib marks colour-bar axes with ``_colorbar``)."""
    return getattr(ax, "_colorbar", None) is not None
