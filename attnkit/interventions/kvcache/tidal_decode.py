"""TidalDecode (Yang et al., ICLR 2025, arXiv 2410.05076; repo DerrickYLJ/TidalDecode), METHODS-2.md §8b: position-
persistent sparse attention at decode time, simulated exactly.

Rule (released code, ``src/tidal_build/modify_llama.py``; decode steps only, prefill is full attention everywhere):

* layers ``< sparse_layer_start`` (default 2): full attention;
* layer ``sparse_layer_start``: scores ``q·kᵀ/√d`` under the model's mask per **query head**; the top-``k`` key
  positions per head (``k = min(top_k, #keys)``) are the selection; this layer itself attends fully;
* later layers up to ``correction_layer − 1``: every head attends only to its own selection (``−∞`` elsewhere);
* ``correction_layer`` (default 13, the scripts' value; the function default in ``modify_llama.py`` is 9): full
  attention and a fresh top-``k``; later layers use that selection.

The current token is selectable but not forced; there is no forced sink or window. The selection is kept as
sequence positions, so a layer whose cache holds a window of the sequence (Gemma-3's sliding layers) attends to the
selected tokens its window still holds. Keys keep their positions, so
the ``−∞`` mask (``score_bias``, fused ``torch`` backend) reproduces the method exactly. ``top_k`` defaults to 256
(``enable_tidal``; the NIAH scripts use 128, LongBench 4096). The account (:attr:`TidalDecode.account`) counts the
keys each decode step attends over every layer ≥ ``sparse_layer_start`` (the two full layers included).

A decode call with several new tokens (chunked prefill on a cache) selects per query row.

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")                 # 2 layers
    >>> tidal = TidalDecode(top_k=3, sparse_layer_start=0, correction_layer=5)
    >>> with attnkit.attach(model, [tidal]):
    ...     out = model.generate(torch.tensor([[1, 5, 7, 9, 11, 13, 15]]), max_new_tokens=2, do_sample=False)
    >>> tidal.account.summary()["per_layer"][1] < 1.0       # layer 1 attends 3 of 8, then 3 of 9 keys
    True
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.kvcache._sparse import KeyAccount, check_int, keep_bias, key_indices, raw_scores, visible
from attnkit.targets import Target


def tidal_select(scores: torch.Tensor, allowed: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep mask ``[B, H, Q, K]``: the ``min(top_k, K)`` highest scores per row among the allowed keys (ties: the
    earlier key). scores ``[B, H, Q, K]``, allowed broadcastable bool.

    Example (METHODS-2.md §8b worked example):
        >>> s = torch.tensor([2.0, 0.5, 1.5, -1.0]).view(1, 1, 1, 4)
        >>> tidal_select(s, torch.ones(1, 1, 1, 4, dtype=torch.bool), 2).flatten().int().tolist()
        [1, 0, 1, 0]
    """
    k = min(int(top_k), scores.shape[-1])
    masked = scores.float().masked_fill(~allowed, float("-inf"))
    idx = masked.topk(k, dim=-1).indices  # [B, H, Q, k]
    return torch.zeros(masked.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)


@register_intervention
class TidalDecode(Intervention):
    name = "tidal-decode"
    description = "TidalDecode: top-k keys chosen at one layer (and a correction layer) reused by the layers after"
    requires = frozenset({"text_decoder"})
    conformance = {
        "neutral": {"top_k": 100_000, "sparse_layer_start": 0}, "active": {"top_k": 2, "sparse_layer_start": 0},
        "not_applicable": {"generate": "a decode-time method: a recomputed prefill attends fully, decode steps do not"}}

    def __init__(self, top_k: int = 256, sparse_layer_start: int = 2, correction_layer: int = 13, **target):
        if target.get("layers") is not None or target.get("heads") is not None:
            raise ValueError("tidal-decode: the layers are set by sparse_layer_start and correction_layer; do not "
                             "pass layers/heads")
        super().__init__(**target)
        self.top_k = check_int(self.name, "top_k", top_k, 1)
        self.sparse_layer_start = check_int(self.name, "sparse_layer_start", sparse_layer_start)
        self.correction_layer = check_int(self.name, "correction_layer", correction_layer)
        self.account = KeyAccount()
        self._picked: dict = {}  # (sequence, forward index) -> [B, H, Q, T] selected sequence positions

    def setup(self, model) -> None:
        n_layers = model.component("text").num_layers
        if self.sparse_layer_start >= n_layers:
            raise ValueError(f"tidal-decode: sparse_layer_start={self.sparse_layer_start} but the model has "
                             f"{n_layers} layers; nothing would be sparse")
        self.target = Target(layers=list(range(self.sparse_layer_start, n_layers)), modules=self.target.modules)
        self._picked = {}

    def score_bias(self, ctx):
        if ctx.is_prefill:
            return None  # prefill: full attention everywhere
        allowed = visible(ctx)  # [B, 1, Q, K]
        key = (ctx.tracker.sequence_id if ctx.tracker is not None else 0, ctx.step)
        rows = ctx.query_mask("real") if ctx.tracker is not None else None
        where = key_indices(ctx)  # [B, K] sequence position of each key slot
        if ctx.layer in (self.sparse_layer_start, self.correction_layer):
            keep = tidal_select(raw_scores(ctx), allowed, self.top_k)  # [B, H, Q, K]
            picked = torch.zeros(*keep.shape[:3], ctx.tracker.length if ctx.tracker is not None else ctx.k_len,
                                 dtype=torch.bool, device=ctx.device)
            picked.scatter_(-1, where[:, None, None, :].expand_as(keep), keep)
            self._picked = {key: picked}  # this forward only
            self.account.add(ctx.layer, None, allowed, ctx.heads, rows)
            return None  # the selection layers attend fully
        picked = self._picked.get(key)
        if picked is None:
            self.account.add(ctx.layer, None, allowed, ctx.heads, rows)
            return None
        keep = picked.gather(-1, where[:, None, None, :].expand(*picked.shape[:3], -1))  # [B, H, Q, K]
        self.account.add(ctx.layer, keep, allowed, ctx.heads, rows)
        return keep_bias(keep)  # [B, H, Q, K]
