"""Before/after comparisons: any attnkit.viz figure drawn twice, side by side, on one scale."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from matplotlib.figure import Figure, FigureBase

from ._common import PREFERRED_SIZE_ATTR, is_colorbar_axes


def before_after(
    before: Any,
    after: Any,
    plot_fn: Callable[..., FigureBase],
    titles: tuple[str, str] = ("baseline", "intervened"),
    title: str | None = None,
    *,
    arg: str | None = None,
    share_scale: bool = True,
    figsize: tuple[float, float] | None = None,
    **kwargs: Any,
) -> Figure:
    """Draw ``plot_fn(before)`` and ``plot_fn(after)`` side by side in one Figure and return it.

    Args:
        before, after: the data that differs between the two panels. Passed as ``plot_fn``'s first positional
            argument, or as the keyword ``arg`` when given (e.g. ``arg="token_attention"`` for image_overlay), or
            — when a dict — as keyword arguments (e.g. ``{"first_token_mass": a, "other_sink_mass": b}``).
        plot_fn: any attnkit.viz function, or your own taking ``fig=`` (a SubFigure to draw into) and ``title=``.
        titles: the two panels' titles.
        title: the whole figure's title.
        share_scale: give corresponding colour maps one colour scale (and their colour bars follow), and
            corresponding line plots the same y limits, so the two sides can be compared by eye.
        figsize: overall size (default: the two panels' preferred sizes side by side).
        **kwargs: passed to both calls (e.g. ``tokens=``, ``grid=``).

    Example:
        >>> import torch
        >>> from attnkit.viz import attention_heatmap, before_after
        >>> base = torch.softmax(torch.randn(4, 4), -1)
        >>> fig = before_after(base, base.roll(1, -1), attention_heatmap, tokens=list("abcd"))
        >>> [sub.axes[0].images[0].get_clim() == fig.subfigs[0].axes[0].images[0].get_clim() for sub in fig.subfigs]
        [True, True]
    """
    _check_plot_fn(plot_fn)
    if len(titles) != 2:
        raise ValueError(f"titles must hold two strings (got {len(titles)}: {titles!r})")
    fig = Figure(layout="constrained")
    subfigs = fig.subfigures(1, 2, wspace=0.03)
    for sub, data, panel_title in zip(subfigs, (before, after), titles):
        args, call_kwargs = _call_args(data, arg, kwargs)
        plot_fn(*args, fig=sub, title=panel_title, **call_kwargs)
    if share_scale:
        _share_colour_scales(subfigs[0], subfigs[1])
        _share_y_limits(subfigs[0], subfigs[1])
    fig.set_size_inches(figsize or _combined_size(subfigs))
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig


def _check_plot_fn(plot_fn: Callable) -> None:
    if not callable(plot_fn):
        raise TypeError(f"plot_fn must be callable (got {type(plot_fn).__name__})")
    try:
        params = inspect.signature(plot_fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [name for name in ("fig", "title") if name not in params and not has_var_kw]
    if missing:
        raise TypeError(
            f"plot_fn {getattr(plot_fn, '__name__', plot_fn)!r} must accept keyword arguments fig= and title= "
            f"(missing: {', '.join(missing)}); every attnkit.viz function does"
        )


def _call_args(data: Any, arg: str | None, kwargs: dict) -> tuple[tuple, dict]:
    if arg is not None:
        return (), {**kwargs, arg: data}
    if isinstance(data, Mapping):
        return (), {**kwargs, **data}
    return (data,), dict(kwargs)


def _colorbar_axes(sub: FigureBase) -> set:
    attached = {im.colorbar.ax for ax in sub.axes for im in ax.images if getattr(im, "colorbar", None) is not None}
    return attached | {ax for ax in sub.axes if is_colorbar_axes(ax)}


def _scalar_images(sub: FigureBase) -> list:
    """Colour-mapped (2-D) images in drawing order, leaving out RGB pictures and colour bars."""
    skip = _colorbar_axes(sub)
    return [im for ax in sub.axes if ax not in skip for im in ax.images if im.get_array().ndim == 2]


def _share_colour_scales(left: FigureBase, right: FigureBase) -> None:
    """Pair the i-th colour-mapped image of each side and give both their joint limits."""
    a, b = _scalar_images(left), _scalar_images(right)
    if len(a) != len(b):
        return  # different structures: nothing sensible to pair
    for im_a, im_b in zip(a, b):
        (lo_a, hi_a), (lo_b, hi_b) = im_a.get_clim(), im_b.get_clim()
        joint = (min(lo_a, lo_b), max(hi_a, hi_b))
        im_a.set_clim(*joint)
        im_b.set_clim(*joint)


def _plot_axes(sub: FigureBase) -> list:
    skip = _colorbar_axes(sub)
    return [ax for ax in sub.axes if ax not in skip and not ax.images and (ax.lines or ax.patches or ax.collections)]


def _share_y_limits(left: FigureBase, right: FigureBase) -> None:
    """Pair the i-th line/bar axes of each side and give both their joint y limits."""
    a, b = _plot_axes(left), _plot_axes(right)
    if len(a) != len(b):
        return
    for ax_a, ax_b in zip(a, b):
        (lo_a, hi_a), (lo_b, hi_b) = ax_a.get_ylim(), ax_b.get_ylim()
        joint = (min(lo_a, lo_b), max(hi_a, hi_b))
        ax_a.set_ylim(joint)
        ax_b.set_ylim(joint)


def _combined_size(subfigs) -> tuple[float, float]:
    sizes = [getattr(sub, PREFERRED_SIZE_ATTR, (6.0, 4.5)) for sub in subfigs]
    return sum(w for w, _ in sizes) + 0.2, max(h for _, h in sizes) + 0.4
