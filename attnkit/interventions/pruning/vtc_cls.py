"""VTC-CLS (Wang et al., arXiv 2412.05819): keep the top-U image tokens by the vision encoder's [CLS] attention.

Score of patch j: ``s_j = Σ_{ℓ ∈ [start, L_v − 2]} mean_h A^ℓ[CLS → j]`` (a layer ensemble ending at the penultimate
layer LLaVA takes its features from). Per sample (the released code averages over the *batch* for B > 1 — fixed
here) the top ``keep`` patches survive, in raster order.

Layers (``start_layer``): the default (``None``) is the released default, ``--layer 16`` on LLaVA-1.5's 24-layer
CLIP-L/336, i.e. the ensemble of layers 16–22 (``attentions[16:-1]``). For a tower of another depth ``L_v`` the same
fraction is kept: ``start = round(16·L_v/24)`` (the last third of the tower), capped at ``L_v − 2`` so the
ensemble is never empty — 12 layers → 8–10, 32 → 21–30, 2 → layer 0 alone (:func:`released_start_layer`). An int
picks the start explicitly (negative counts from the end; ``-2`` = the penultimate layer alone, the single-layer
variant attnkit used to default to). Default = the released ensemble because the published results use it.

How image tokens in ``input_ids`` are handled: the prompt keeps all its image placeholders, the model projects every
patch as usual, and the dropped image tokens are removed from the hidden states **before decoder layer 0** (a real
shorter sequence; :mod:`attnkit.interventions.pruning._drop`). Positions: ``positions="contiguous"`` (default,
LLaVA's view of a shorter image) re-indexes the kept tokens 0..n−1 and shifts decode positions accordingly;
``"original"`` keeps the gaps. The [CLS] rows come from hooks on the tower's q/k projections (no eager needed).
Supported: CLIP-style towers with a [CLS] token and one un-cropped image per sample (LLaVA-1.5).

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_vlm, vlm_inputs
    >>> model = tiny_vlm("llava"); inputs = vlm_inputs("llava", model, batch=2)   # 16 image tokens each
    >>> with attnkit.attach(model, [VTCCLS(keep=4, start_layer=0)]), torch.no_grad():
    ...     model(**inputs).logits.shape[1]                                       # 24 - 12
    12
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.pruning._drop import TokenDropper, top_fraction_keep
from attnkit.interventions.pruning._vision_cls import ClsAttention, image_token_scores, vision_layers
from attnkit.targets import Target

#: the released default: ``--layer 16`` of CLIP-L/336's 24 layers
RELEASED_START, RELEASED_DEPTH = 16, 24


def released_start_layer(depth: int) -> int:
    """First layer of the released VTC-CLS ensemble scaled to a tower of ``depth`` layers (it ends at ``depth − 2``).

    Example:
        >>> [released_start_layer(n) for n in (24, 12, 32, 2, 1)]
        [16, 8, 21, 0, 0]
    """
    return max(0, min(round(RELEASED_START * depth / RELEASED_DEPTH), depth - 2))


def ensemble_layers(depth: int, start_layer: int | None) -> list[int]:
    """The vision layers whose [CLS] rows are summed: ``start .. depth − 2`` (at least one layer).

    Example:
        >>> ensemble_layers(24, None), ensemble_layers(24, -2), ensemble_layers(2, 0)
        ([16, 17, 18, 19, 20, 21, 22], [22], [0])
    """
    if start_layer is None:
        start = released_start_layer(depth)
    else:
        start = start_layer + depth if start_layer < 0 else start_layer
    return list(range(start, max(start + 1, depth - 1)))


@register_intervention
class VTCCLS(Intervention):
    name = "vtc-cls"
    conformance = {"neutral": {"keep": 10_000}, "active": {"keep": 4}}
    requires = frozenset({"image_tokens", "clip_cls_tower"})
    description = "VTC-CLS: keep the top-U image tokens by the vision [CLS] attention (layer ensemble)"

    def __init__(self, keep: int = 36, start_layer: int | None = None, positions: str = "contiguous", **target):
        if target.get("layers") is not None:
            raise ValueError("vtc-cls: the vision layers are start_layer..L_v-2; do not pass layers")
        super().__init__(**target)
        self.keep, self.start_layer, self.positions = keep, start_layer, positions
        self._handle = None
        self._cls: ClsAttention | None = None
        self._dropper: TokenDropper | None = None

    def setup(self, model) -> None:
        self.target = Target(layers=[0], heads=None, modules=self.target.modules)  # observer entry on LM layer 0

    def install(self, handle) -> list:
        model = handle.model
        self._handle = handle
        self._cls = ClsAttention(model, layers=ensemble_layers(len(vision_layers(model)), self.start_layer))
        self._strategy = getattr(model.config, "vision_feature_select_strategy", "default")
        self._dropper = TokenDropper(handle, 0, self.select, positions=self.positions)
        return self._cls.install(handle) + self._dropper.install()

    def select(self, hidden=None) -> torch.Tensor | None:
        tracker = self._handle.tracker
        image = tracker.mask("image")  # [B, N]
        if not bool(image.any()) or not self._cls.rows:
            return None
        scores = image_token_scores(self._cls.patch_scores(self._strategy), image)  # [B, N]
        self._cls.rows.clear()
        keep = top_fraction_keep(scores, image, keep_count=self.keep)
        return keep if hidden is None else keep.to(hidden.device)

    def score_bias(self, ctx):
        return None  # observer: attnkit needs one planned site; the work happens in install()'s hooks

    @property
    def last_counts(self):
        return None if self._dropper is None else self._dropper.last_counts
