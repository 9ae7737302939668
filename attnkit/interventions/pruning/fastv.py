"""FastV (Chen et al., ECCV 2024): drop the image tokens that receive the least attention at layer K−1.

Rule (per sample, unlike the released code which uses batch element 0):

1. score each image token by the attention it receives at layer ``K−1``, averaged over heads:
   ``rule="last"`` (default, the released code): the last prompt row only, ``s_j = mean_h A[h, last, j]``;
   ``rule="all"`` (the paper): the mean over every real query row, ``s_j = mean_h mean_i A[h, i, j]``;
   ``rule="random"``: a seeded random score (the paper's K=0 ablation);
2. keep the top ``round(n_img·(1−ratio))`` image tokens (ties → earlier token); every text token survives;
3. from layer ``K`` on: ``mode="drop"`` (default) removes the others from the hidden states — a real shorter
   sequence, original position ids, per-sample masks (:mod:`attnkit.interventions.pruning._drop`);
   ``mode="mask"`` removes nothing and masks the dropped tokens as keys in layers ``≥ K`` (the accuracy-ablation
   path; it gives the same outputs at kept positions and runs on the fused ``torch`` backend).

With a KV cache the selection is made once at prefill (as the FastV README's cached variant); without a cache every
forward re-selects. The statistic comes from an attnkit capture of layer ``K−1``: ``rule="last"`` computes one row
(``[B,H,1,N]``), ``rule="all"`` materialises that one layer's ``[B,H,N,N]`` map during prefill.

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_vlm, vlm_inputs
    >>> model = tiny_vlm("llava"); inputs = vlm_inputs("llava", model, batch=2)
    >>> with attnkit.attach(model, [FastV(k=1, ratio=0.5)]) as handle, torch.no_grad():
    ...     logits = model(**inputs).logits
    >>> inputs["input_ids"].shape[1], logits.shape[1]   # 16 image tokens → 8 dropped from layer 1 on
    (24, 16)
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.pruning._drop import TokenDropper, top_fraction_keep
from attnkit.targets import Target

RULES = ("last", "all", "random")


def fastv_scores(probs: torch.Tensor, query_real: torch.Tensor | None = None) -> torch.Tensor:
    """Attention received per key from captured rows: head mean, then row mean over real queries.

    probs ``[B, H, R, K]``, query_real ``[B, R]`` bool (None = all rows) → ``[B, K]``.

    Example:
        >>> p = torch.tensor([[[[0.5, 0.5], [0.2, 0.8]]]])   # B=1, H=1, R=2, K=2
        >>> fastv_scores(p).tolist()
        [[0.3499999940395355, 0.6499999761581421]]
    """
    per_row = probs.float().mean(1)  # [B, R, K]
    if query_real is None:
        return per_row.mean(1)
    w = query_real.float().to(per_row.device)  # [B, R]
    return (per_row * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


@register_intervention
class FastV(Intervention):
    name = "fastv"
    conformance = {
        "neutral": {"ratio": 0.0, "k": 1}, "active": {"ratio": 0.5, "k": 1},
        "not_applicable": {"generate": "image tokens are ranked and dropped once, at the prefill; recomputing ranks "
                                       "them again from the newest query"}}
    requires = frozenset({"text_decoder", "image_tokens"})
    description = "FastV: drop the least-attended image tokens after layer K (real shorter sequence)"

    def __init__(self, k: int = 2, ratio: float = 0.5, rule: str = "last", mode: str = "drop", seed: int = 0,
                 span: str = "image", **target):
        if rule not in RULES:
            raise ValueError(f"fastv: rule must be one of {RULES}, got {rule!r}")
        if mode not in ("drop", "mask"):
            raise ValueError(f"fastv: mode must be 'drop' or 'mask', got {mode!r}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"fastv: ratio (fraction of image tokens dropped) must be in [0, 1], got {ratio}")
        if k < 1 and rule != "random":
            raise ValueError("fastv: k=0 has no layer K-1 to rank with; use rule='random' (the paper's ablation)")
        if target.get("layers") is not None:
            raise ValueError("fastv: the layers are set by k (ranking at k-1, pruning from k); do not pass layers")
        super().__init__(**target)
        self.k, self.ratio, self.rule, self.mode, self.seed, self.span = k, ratio, rule, mode, seed, span
        self._handle = None
        self._capture = None
        self._dropper: TokenDropper | None = None
        self._dropped: tuple[int, torch.Tensor] | None = None  # (sequence id, dropped [B, N]) for mask mode

    # ---- planning -------------------------------------------------------------------------------------------
    def setup(self, model) -> None:
        num_layers = model.component("text").num_layers
        if self.k >= num_layers:
            raise ValueError(f"fastv: k={self.k} but the model has layers 0..{num_layers - 1}")
        first = max(self.k - 1, 0)  # the ranking layer observes; mask mode also edits k..L-1
        layers = list(range(first, num_layers)) if self.mode == "mask" else [first]
        self.target = Target(layers=layers, heads=self.target.heads, modules=self.target.modules)

    def install(self, handle) -> list:
        self._handle = handle
        hooks = []
        if self.rule != "random":
            self._capture = handle.capture(layers=[self.k - 1], heads=self._score_heads(),
                                           queries="last" if self.rule == "last" else "all")
            hooks.append(_PrefillOnly(handle, self._capture))
        if self.mode == "drop":
            self._dropper = TokenDropper(handle, self.k, self.select)
            hooks.extend(self._dropper.install())
        return hooks

    def _score_heads(self):
        heads = self.target.heads
        return None if heads is None or heads == "all" or isinstance(heads, dict) else heads

    # ---- selection --------------------------------------------------------------------------------------------
    def scores(self) -> torch.Tensor:
        """``[B, N]`` FastV score of every prefill token (only image tokens are used)."""
        tracker = self._handle.tracker
        if self.rule == "random":
            g = torch.Generator().manual_seed(self.seed + tracker.sequence_id)
            return torch.rand(tracker.batch, tracker.length, generator=g)
        probs = self._capture.last(self.k - 1)  # [B, H, R, N]
        rows = None if self.rule == "last" else tracker.mask("real")
        self._capture.records.clear()
        return fastv_scores(probs, rows)

    def select(self, hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """``keep [B, N]`` for the current prefill (None when the batch has no image token)."""
        tracker = self._handle.tracker
        candidates = tracker.mask(self.span)  # [B, N] image tokens (real only)
        if not bool(candidates.any()):
            return None
        keep = top_fraction_keep(self.scores(), candidates, keep_ratio=1.0 - self.ratio)
        return keep.to(hidden.device) if hidden is not None else keep

    @property
    def last_counts(self):
        """``(tokens before, tokens after)`` per sample for the last prefill (drop mode)."""
        return None if self._dropper is None else self._dropper.last_counts

    # ---- attention hook: the ranking layer observes; mask mode hides dropped keys -----------------------------
    def score_bias(self, ctx):
        if self.mode != "mask" or ctx.layer < self.k:
            return None  # observer entry: routes layer K-1 through attnkit so the capture sees it
        tracker = ctx.tracker
        if ctx.is_prefill and (self._dropped is None or self._dropped[0] != tracker.sequence_id):
            keep = self.select()
            dropped = ~keep if keep is not None else torch.zeros(tracker.batch, tracker.length, dtype=torch.bool)
            self._dropped = (tracker.sequence_id, dropped)
        if self._dropped is None or self._dropped[0] != tracker.sequence_id:
            return None
        dropped = self._dropped[1]  # [B, N]
        full = torch.zeros(tracker.batch, tracker.length, dtype=torch.bool)
        full[:, : dropped.shape[1]] = dropped
        keys = full[:, tracker.length - ctx.k_len:].to(ctx.device)  # [B, K]
        zero = torch.zeros((), device=ctx.device)
        return torch.where(keys, float("-inf"), zero)[:, None, None, :]  # [B, 1, 1, K]


class _PrefillOnly:
    """Keeps a capture active only during prefill forwards (decode steps need no statistic)."""

    def __init__(self, handle, capture):
        from attnkit.hooks.transformers import text_model_of

        self.handle, self.capture = handle, capture
        model = text_model_of(handle.model) or handle.model
        self._hook = handle.hook(model, self._pre, pre=True)

    def _pre(self, module, args):
        self.capture.active = self.handle.tracker.last_was_prefill
        if self.capture.active:
            self.capture.records.clear()

    def remove(self) -> None:
        self._hook.remove()
        self.capture.stop()
