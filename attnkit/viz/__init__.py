"""Figures for attention: heat maps, head-score grids, sink views, image / latent overlays, before vs after.

Every plotting function takes plain tensors or arrays (no dependency on the capture API), returns a matplotlib Figure
made without pyplot (nothing global to close; Jupyter displays it), and accepts ``fig=`` to draw into an
existing Figure or SubFigure. :func:`attention_view` builds an interactive HTML view (hover a token to see its
captured row) from a capture instead; see :mod:`attnkit.viz.interactive`.

Example:
    >>> import torch
    >>> from attnkit import viz
    >>> fig = viz.attention_heatmap(torch.softmax(torch.randn(3, 5, 5), -1), tokens=list("abcde"))
    >>> len(fig.axes)
    4
"""

from .compare import before_after
from .heads import head_score_grid, top_k_heads
from .heatmap import attention_heatmap
from .interactive import AttentionView, attention_view
from .io import save_figure
from .overlay import as_image, cross_attention_maps, image_overlay, to_grid
from .sinks import sink_view
from .tokens import detect_scheme, readable_token, token_labels

__all__ = [
    "AttentionView",
    "attention_view",
    "as_image",
    "attention_heatmap",
    "before_after",
    "detect_scheme",
    "cross_attention_maps",
    "head_score_grid",
    "image_overlay",
    "readable_token",
    "save_figure",
    "sink_view",
    "to_grid",
    "token_labels",
    "top_k_heads",
]
