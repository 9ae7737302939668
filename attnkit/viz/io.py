"""Saving figures."""

from __future__ import annotations

import sys
from pathlib import Path

from matplotlib.figure import FigureBase


def save_figure(fig: FigureBase, path: str | Path, dpi: int = 150, **savefig_kwargs) -> Path:
    """Save ``fig`` to ``path`` (format from the suffix, parent folders created), close it, return the path.

    Example:
        >>> import tempfile, torch
        >>> from attnkit.viz import head_score_grid, save_figure
        >>> out = save_figure(head_score_grid(torch.rand(3, 2)), tempfile.mkdtemp() + "/figs/heads.png")
        >>> out.exists()
        True
    """
    if not isinstance(fig, FigureBase):
        raise TypeError(f"fig must be a matplotlib Figure (got {type(fig).__name__})")
    figure = fig.figure if fig.figure is not None else fig  # a SubFigure saves its whole parent figure
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    savefig_kwargs.setdefault("bbox_inches", "tight")
    figure.savefig(path, dpi=dpi, **savefig_kwargs)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # only figures made through pyplot are registered there; ours are not
        pyplot.close(figure)
    return path
