"""Before/after comparisons: any attnkit.viz figure drawn twice, side by side, on one scale."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from matplotlib.figure import Figure, FigureBase

from ._common import PREFERRED_SIZE_ATTR, is_colorbar_axes

_DEFAULT_SIZE = (6.0, 4.5)  # for a plot_fn that does not record a preferred size


def before_after(
    before: Any,
    after: Any,
    plot_fn: Callable[..., FigureBase],
    titles: tuple[str, str] = ("baseline", "intervened"),
    title: str | None = None,
    *,
    arg: str | None = None,
    share_scale: bool = True,
    direction: str = "auto",
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
        direction: ``"horizontal"`` (side by side), ``"vertical"`` (stacked) or ``"auto"``: stacked when one
            panel is much wider than tall (e.g. sink_view over many layers), side by side otherwise.
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
    if direction not in ("auto", "horizontal", "vertical"):
        raise ValueError(f"direction must be 'auto', 'horizontal' or 'vertical' (got {direction!r})")
    calls = [_call_args(data, arg, kwargs) for data in (before, after)]
    if direction == "auto":
        direction = "vertical" if _is_wide(plot_fn, *calls[0]) else "horizontal"
    fig = Figure(layout="constrained")
    shape = (1, 2) if direction == "horizontal" else (2, 1)
    subfigs = list(fig.subfigures(*shape, wspace=0.03, hspace=0.03).flat)
    for sub, (args, call_kwargs), panel_title in zip(subfigs, calls, titles):
        plot_fn(*args, fig=sub, title=panel_title, **call_kwargs)
    if share_scale:
        _share_colour_scales(subfigs[0], subfigs[1])
        _share_y_limits(subfigs[0], subfigs[1])
    fig.set_size_inches(figsize or _combined_size(subfigs, direction))
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


def _is_wide(plot_fn: Callable, args: tuple, call_kwargs: dict) -> bool:
    """Draw once into a scratch figure to learn the panel's preferred size; wide means w > 1.8 h."""
    probe = Figure().subfigures(1, 1)
    plot_fn(*args, fig=probe, title="", **call_kwargs)
    width, height = getattr(probe, PREFERRED_SIZE_ATTR, _DEFAULT_SIZE)
    return width > 1.8 * height


def _combined_size(subfigs, direction: str) -> tuple[float, float]:
    sizes = [getattr(sub, PREFERRED_SIZE_ATTR, _DEFAULT_SIZE) for sub in subfigs]
    if direction == "vertical":
        return max(w for w, _ in sizes) + 0.2, sum(h for _, h in sizes) + 0.5
    return sum(w for w, _ in sizes) + 0.2, max(h for _, h in sizes) + 0.5
