"""Visual-token exit: every image token leaves the sequence from layer K on (the text continues alone).

It is FastV with ``ratio=1`` and no ranking: layers ``< K`` see the image, layers ``≥ K`` run on the text tokens
only (a real shorter sequence with original positions; with a KV cache those layers never store image keys).
``mode="mask"`` keeps the tokens but hides them as keys instead (same outputs at the text positions).

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_vlm, vlm_inputs
    >>> model = tiny_vlm("llava"); inputs = vlm_inputs("llava", model, batch=1)
    >>> with attnkit.attach(model, [VisualExit(k=1)]), torch.no_grad():
    ...     model(**inputs).logits.shape[1]     # 24 tokens, 16 of them image tokens
    8
"""

from __future__ import annotations

from attnkit.interventions.base import register_intervention
from attnkit.interventions.pruning.fastv import FastV


@register_intervention
class VisualExit(FastV):
    name = "visual-exit"
    conformance = {"neutral": None, "active": {"k": 1}}
    description = "drop all image tokens from layer K on"

    def __init__(self, k: int = 2, mode: str = "drop", span: str = "image", **target):
        super().__init__(k=k, ratio=1.0, rule="random", mode=mode, span=span, **target)
