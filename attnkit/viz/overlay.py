"""Attention over spatial tokens: LVLM image patches and diffusion latents, overlaid on the picture."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import FigureBase

from ._common import (
    as_array,
    check_finite_nonempty,
    check_labels,
    check_ndim,
    new_figure,
    opaque_colorbar,
    shape_str,
    truncate_label,
    value_range,
)


def as_image(image: Any, name: str = "image") -> np.ndarray:
    """An ``[H, W, 3|4]`` (or ``[H, W]`` grey) float array in [0, 1] from a PIL image, array or tensor.

    uint8 data (and float data above 1) is divided by 255; ``[3, H, W]`` channel-first input is transposed.

    Example:
        >>> import numpy as np
        >>> float(as_image(np.full((2, 3, 3), 255, dtype=np.uint8)).max())
        1.0
    """
    if hasattr(image, "convert") and hasattr(image, "size") and not hasattr(image, "shape"):  # PIL.Image
        image = np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))
    raw = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    arr = as_array(raw, name)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"{name} must have shape [H, W, 3], [H, W, 4] or [H, W] (got shape {shape_str(arr.shape)})")
    check_finite_nonempty(arr, name)
    if raw.dtype == np.uint8 or arr.max() > 1.0:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def to_grid(values: np.ndarray, grid: tuple[int, int] | None, name: str) -> np.ndarray:
    """Reshape ``[h*w]`` (or check ``[h, w]``) values to the ``grid``; a square grid is inferred when None.

    Example:
        >>> import numpy as np
        >>> to_grid(np.arange(6.0), (2, 3), "token_attention").shape
        (2, 3)
    """
    if values.ndim == 2 and (grid is None or tuple(values.shape) == tuple(grid)):
        return values
    n = values.shape[-1]
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"{name} has {n} spatial tokens (shape {shape_str(values.shape)}), which is not a square number: "
                "pass grid=(h, w) with h*w equal to it"
            )
        grid = (side, side)
    h, w = (int(g) for g in grid)
    if values.ndim != 1 or h * w != n:
        raise ValueError(
            f"{name} must have shape [h*w] = [{h * w}] or [h, w] = [{h}, {w}] for grid=({h}, {w}) "
            f"(got shape {shape_str(values.shape)})"
        )
    return values.reshape(h, w)


def image_overlay(
    image: Any,
    token_attention: Any,
    grid: tuple[int, int] | None = None,
    title: str | None = None,
    *,
    span: tuple[int, int] | None = None,
    normalize: bool = False,
    alpha: float = 0.55,
    upsample: str = "bilinear",
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "turbo",
    show_image: bool = True,
    fig: FigureBase | None = None,
) -> FigureBase:
    """Attention of one (generated) token over an image's patch tokens, upsampled onto the image; returns the Figure.

    The figure has two panels: the image alone and the image with the attention overlaid (plus a colour bar).
    The overlay's data is exactly the ``[h, w]`` patch grid (``fig.axes[1].images[1].get_array()``);
    matplotlib upsamples it to the image size when drawing.

    Args:
        image: PIL image, ``[H, W, 3]`` / ``[H, W]`` array (uint8 or floats in [0, 1]) or ``[3, H, W]`` tensor.
        token_attention: ``[h*w]`` attention on the patch tokens, ``[h, w]``, or ``[heads, h*w]`` (averaged over
            heads). With ``span=(start, end)`` it may be a row over the whole key sequence; the image tokens
            ``[start:end]`` are taken from it.
        grid: patch grid ``(h, w)``; inferred for a square number of patches.
        normalize: divide by the total attention on the image, showing each patch's share of it.
        alpha: opacity of the overlay.
        upsample: matplotlib interpolation for the upsampling ("bilinear", "bicubic", "nearest" …).
        vmin, vmax: colour limits (default the data range).
        show_image: also draw the plain image in a panel on the left.
        fig: draw into this Figure / SubFigure instead of a new one.

    Example:
        >>> import numpy as np
        >>> from attnkit.viz import image_overlay
        >>> img = np.zeros((32, 32, 3), dtype=np.uint8)
        >>> fig = image_overlay(img, np.random.rand(16), grid=(4, 4), title="token 'cat'")
        >>> fig.axes[1].images[1].get_array().shape
        (4, 4)
    """
    picture = as_image(image)
    att = as_array(token_attention, "token_attention")
    check_ndim(att, "token_attention", {1: "[h*w]", 2: "[h, w] or [heads, h*w]"})
    check_finite_nonempty(att, "token_attention")
    if span is not None:
        att = _take_span(att, span)
    if att.ndim == 2 and not _is_grid(att, grid):
        att = att.mean(axis=0)  # [heads, h*w] -> [h*w]
    patches = to_grid(att, grid, "token_attention")
    if normalize:
        total = patches.sum()
        patches = patches / total if total > 0 else patches

    height, width = picture.shape[:2]
    fig = new_figure(fig, (7.8 if show_image else 4.4, 3.9 * height / width + 0.6))
    axes = fig.subplots(1, 2 if show_image else 1, squeeze=False)[0]
    if show_image:
        _draw_image(axes[0], picture, "image")
    ax = axes[-1]
    _draw_image(ax, picture, "attention")
    lo, hi = value_range(patches, vmin, vmax)
    overlay = ax.imshow(patches, extent=(0, width, height, 0), cmap=cmap, norm=Normalize(lo, hi), alpha=alpha,
                        interpolation=upsample)
    opaque_colorbar(fig, overlay, ax, shrink=0.85, label="share of image attention" if normalize else "attention")
    if title:
        fig.suptitle(title)
    return fig


def cross_attention_maps(
    maps: Any,
    tokens: Sequence[str],
    image: Any = None,
    latent_grid: tuple[int, int] | None = None,
    title: str | None = None,
    *,
    step: int | Sequence[int] | str | None = None,
    token_indices: Sequence[int] | None = None,
    normalize: str | None = None,
    alpha: float = 0.6,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "inferno",
    max_cols: int = 6,
    fig: FigureBase | None = None,
) -> FigureBase:
    """Diffusion cross-attention: one panel per prompt token over the latent grid; returns the Figure.

    Args:
        maps: ``[T, h*w]`` (one map per prompt token) or ``[steps, T, h*w]`` (per denoising step).
        tokens: the T prompt-token labels (panel titles).
        image: the generated image; each map is upsampled and overlaid on it when given.
        latent_grid: ``(h, w)`` of the latent; inferred for a square number of positions.
        step: for ``[steps, T, h*w]`` input: None averages over steps; an int picks one step; a list of ints or
            ``"all"`` draws one row per step.
        token_indices: which of the T tokens to show (e.g. skip ``<|startoftext|>`` and padding).
        normalize: None keeps one colour scale for all panels; ``"per_token"`` scales each panel to [0, 1]
            (its own min and max), as prompt-to-prompt figures do.
        vmin, vmax: colour limits when ``normalize`` is None (default the data range).
        fig: draw into this Figure / SubFigure instead of a new one.

    Example:
        >>> import torch
        >>> from attnkit.viz import cross_attention_maps
        >>> maps = torch.rand(3, 4, 64)  # [steps, T, 8*8]
        >>> fig = cross_attention_maps(maps, ["a", "red", "cat", "<pad>"], token_indices=[0, 1, 2])
        >>> [ax.get_title() for ax in fig.axes[:3]]
        ['a', 'red', 'cat']
    """
    if normalize not in (None, "per_token"):
        raise ValueError(f"normalize must be None or 'per_token' (got {normalize!r})")
    arr = as_array(maps, "maps")
    check_ndim(arr, "maps", {2: "[T, h*w]", 3: "[steps, T, h*w]"})
    check_finite_nonempty(arr, "maps")
    labels = check_labels(tokens, arr.shape[-2], "tokens", f"the token axis of maps (shape {shape_str(arr.shape)})")
    rows, row_names = _select_steps(arr, step)  # [R, T, h*w]
    picks = _token_indices(token_indices, arr.shape[-2])
    grids = np.stack([[to_grid(rows[r, t], latent_grid, "maps") for t in picks] for r in range(len(rows))])
    if normalize == "per_token":
        grids = _minmax(grids)
    picture = as_image(image) if image is not None else None

    n_rows, n_cols = (len(rows), len(picks)) if len(rows) > 1 else (-(-len(picks) // max_cols), min(len(picks), max_cols))
    fig = new_figure(fig, (2.2 * n_cols + 1.0, 2.2 * n_rows + 0.5))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    lo, hi = (0.0, 1.0) if normalize else value_range(grids, vmin, vmax)
    norm = Normalize(lo, hi)
    drawn, mappable = [], None
    for i, ax in enumerate(axes.flat):
        r, c = (i // n_cols, i % n_cols) if len(rows) > 1 else (0, i)
        if c >= len(picks):
            fig.delaxes(ax)
            continue
        mappable = _draw_map(ax, grids[r, c], picture, norm, cmap, alpha)
        ax.set_title(truncate_label(labels[picks[c]], 14) if (r == 0 or len(rows) == 1) else "", fontsize=9)
        if len(rows) > 1 and c == 0:
            ax.set_ylabel(row_names[r], fontsize=9)
        drawn.append(ax)
    bar = {"shrink": 0.85, "label": "relative (per token)" if normalize else "attention"}
    if picture is not None:
        opaque_colorbar(fig, mappable, drawn, **bar)
    else:
        fig.colorbar(mappable, ax=drawn, **bar)
    fig.suptitle(title or f"cross-attention ({row_names[0] if len(rows) == 1 else 'per step'})")
    return fig


def _draw_image(ax, picture: np.ndarray, label: str) -> None:
    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1, interpolation="antialiased")
    ax.set_title(label, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_map(ax, grid: np.ndarray, picture: np.ndarray | None, norm, cmap: str, alpha: float):
    """One token's map: alone (nearest, so latent cells stay visible) or upsampled over the picture."""
    ax.set_xticks([])
    ax.set_yticks([])
    if picture is None:
        return ax.imshow(grid, cmap=cmap, norm=norm, interpolation="nearest")
    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
    height, width = picture.shape[:2]
    colormap = matplotlib.colormaps[cmap]
    return ax.imshow(grid, extent=(0, width, height, 0), cmap=colormap, norm=norm, alpha=alpha,
                     interpolation="bilinear")


def _is_grid(att: np.ndarray, grid) -> bool:
    """Whether 2-D attention is already the ``[h, w]`` patch grid (rather than ``[heads, h*w]``)."""
    if grid is not None:
        return tuple(att.shape) == tuple(int(g) for g in grid)
    return att.shape[0] == att.shape[1]


def _take_span(att: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    start, end = (int(s) for s in span)
    n = att.shape[-1]
    if not 0 <= start < end <= n:
        raise ValueError(f"span={tuple(span)} must satisfy 0 <= start < end <= {n} (token_attention has shape "
                         f"{shape_str(att.shape)})")
    return att[..., start:end]


def _select_steps(arr: np.ndarray, step) -> tuple[np.ndarray, list[str]]:
    """``[R, T, h*w]`` rows to draw and their names, from ``[T, h*w]`` or ``[steps, T, h*w]``."""
    if arr.ndim == 2:
        if step not in (None, 0):
            raise ValueError(f"step={step!r} needs maps of shape [steps, T, h*w] (got shape {shape_str(arr.shape)})")
        return arr[None], ["single map"]
    n_steps = arr.shape[0]
    if step is None:
        return arr.mean(axis=0, keepdims=True), [f"mean over {n_steps} steps"]
    steps = list(range(n_steps)) if step == "all" else [step] if isinstance(step, (int, np.integer)) else list(step)
    for s in steps:
        if not -n_steps <= int(s) < n_steps:
            raise ValueError(f"step {s} is out of range for maps with {n_steps} steps (shape {shape_str(arr.shape)})")
    return arr[[int(s) for s in steps]], [f"step {int(s) % n_steps}" for s in steps]


def _token_indices(indices, n_tokens: int) -> list[int]:
    if indices is None:
        return list(range(n_tokens))
    picks = [int(i) for i in indices]
    bad = [i for i in picks if not -n_tokens <= i < n_tokens]
    if bad or not picks:
        raise ValueError(f"token_indices {picks} must be non-empty and within the {n_tokens} tokens of maps")
    return [i % n_tokens for i in picks]


def _minmax(grids: np.ndarray) -> np.ndarray:
    """Scale each [h, w] map (last two axes) to [0, 1]; constant maps become 0."""
    lo = grids.min(axis=(-2, -1), keepdims=True)
    span = grids.max(axis=(-2, -1), keepdims=True) - lo
    return np.where(span > 0, (grids - lo) / np.where(span > 0, span, 1), 0.0)
