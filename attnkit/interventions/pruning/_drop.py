"""Token dropping between decoder layers: a real, shorter sequence from layer ``start`` on.

Shared by the pruning methods (FastV, visual-token exit, VTC-CLS). A :class:`TokenDropper` puts forward pre-hooks
on the decoder layers ``start..L-1``. At prefill, on layer ``start``, it asks a ``select`` callback for a bool
``keep [B, N]`` (True = keep) and then, for that layer and every later one,

* gathers ``hidden_states`` at the kept tokens (per sample, in original order);
* gathers ``position_ids`` and ``position_embeddings`` (cos, sin) so kept tokens keep their **original** positions
  (unless ``positions="contiguous"``: kept tokens are re-indexed 0..n-1, the standard LLaVA view of a shorter input);
* builds a fresh attention mask over the kept tokens from their original positions (causal, left padding, sliding
  window), in the format the layer expects (bool for SDPA-like implementations, additive float for eager).

Samples may keep different numbers of tokens (different image counts or rounding): the shorter ones get extra slots
(dropped tokens, kept as *masked* keys) so the batch stays rectangular. With a KV cache the pruning happens once at
prefill; layers ``≥ start`` cache only the kept slots and every decode step gets a mask over
``kept slots + new tokens``. Layers below ``start`` are untouched.

Methods stacked after a dropper keep reading correct spans: the dropper registers
:meth:`TokenDropper.key_positions` (the original position of every key slot in layers ``≥ start``) with the span
tracker, and ``ctx.key_mask`` / ``ctx.keys_of`` gather by those positions.

Example:
    >>> import torch
    >>> plan = keep_plan(torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool),
    ...                  real=torch.ones(2, 4, dtype=torch.bool))
    >>> plan.index.tolist(), plan.slot_real.tolist()
    ([[0, 1, 2, 3], [0, 1, 2, 3]], [[True, False, True, True], [True, True, True, True]])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class KeepPlan:
    """Which tokens survive, per sample. All tensors ``[B, N']`` with ``N'`` the longest kept length."""

    index: torch.Tensor  # [B, N'] long: original index of each slot (sorted within a sample)
    slot_real: torch.Tensor  # [B, N'] bool: slot is a kept, real token (False: pad or filler slot)
    seq_len: int  # N, the prefill length before dropping
    new_pos: torch.Tensor | None = None  # [B, N'] long: positions used from layer start on (contiguous mode)
    cache: dict = field(default_factory=dict)  # per-forward gathered kwargs


def keep_plan(keep: torch.Tensor, real: torch.Tensor) -> KeepPlan:
    """Turn ``keep [B, N]`` (True = keep) into slot indices; pads stay (masked) so left padding survives.

    Samples keeping fewer tokens than the longest get filler slots: their earliest dropped tokens, masked as keys."""
    keep = keep.bool()
    batch, n = keep.shape
    counts = keep.sum(1)  # [B]
    width = int(counts.max()) if batch else 0
    order = torch.arange(n, device=keep.device).expand(batch, n)  # [B, N]
    # rank: kept tokens first (in order), then dropped ones (in order) as fillers
    rank_key = torch.where(keep, order, order + n)  # [B, N]
    chosen = rank_key.argsort(dim=1, stable=True)[:, :width]  # [B, N'] original indices
    index, _ = chosen.sort(dim=1)  # [B, N'] back to original order
    slot_keep = torch.gather(keep, 1, index)  # [B, N']
    slot_real = slot_keep & torch.gather(real.to(keep.device).bool(), 1, index)  # [B, N']
    return KeepPlan(index=index, slot_real=slot_real, seq_len=n)


def _gather_seq(x: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather ``x`` along ``seq_dim`` per sample; dim 0 of ``x`` is the batch (size 1 or B) unless ``x`` has an
    extra leading axis (mrope ``[3, B, N]``) in which case dim 1 is. ``index [B, N']``."""
    seq_dim = seq_dim % x.dim()
    batch_dim = 0 if seq_dim == 1 or x.dim() == 2 else seq_dim - 1
    shape = list(x.shape)
    shape[batch_dim] = index.shape[0]
    x = x.expand(shape) if x.shape[batch_dim] == 1 else x
    view = [1] * x.dim()
    view[batch_dim], view[seq_dim] = index.shape[0], index.shape[1]
    idx = index.to(x.device).view(view)
    expand = list(x.shape)
    expand[seq_dim] = index.shape[1]
    return torch.gather(x, seq_dim, idx.expand(expand))


def build_mask(q_pos, k_pos, k_real, like: torch.Tensor | None, dtype, window: int | None = None):
    """Attention mask ``[B, 1, Q, K]`` over explicit positions: key j visible to query i iff ``k_real[j]`` and
    ``k_pos[j] <= q_pos[i]`` (and within ``window``). ``like``: the mask transformers passed (its dtype decides
    the format: float → additive, else bool). Queries that see nothing (pads) see themselves, avoiding NaN rows."""
    allowed = k_real[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, Q, K]
    if window is not None:
        allowed &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    empty = ~allowed.any(-1, keepdim=True)  # [B, Q, 1]
    allowed |= empty & (k_pos[:, None, :] == q_pos[:, :, None])
    allowed = allowed[:, None]  # [B, 1, Q, K]
    if like is not None and like.dtype.is_floating_point:
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        return torch.where(allowed.to(like.device), zero, torch.finfo(like.dtype).min)
    return allowed.to(like.device if like is not None else allowed.device)


def gather_mask(like: torch.Tensor, q_index: torch.Tensor | None, k_index: torch.Tensor, k_real: torch.Tensor):
    """The model's own mask ``like [B|1, H|1, Q0, K0]`` (bool, True = attend; or additive float) at the original
    query rows ``q_index [B, Q]`` (None: keep its rows) and key columns ``k_index [B, K]`` → ``[B, H|1, Q, K]``
    in the same format. Filler key slots (``k_real`` False) are masked; a row left empty sees its own slot.

    Example (a bidirectional block over original tokens 1-2, token 2 dropped):
        >>> allowed = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
        >>> keep = torch.tensor([[0, 1, 3]])
        >>> gather_mask(allowed[None, None], keep, keep, torch.ones(1, 3, dtype=torch.bool))[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    B = k_index.shape[0]
    mask = like.expand(B, *like.shape[1:]) if like.shape[0] == 1 else like  # [B, H, Q0, K0]
    H = mask.shape[1]
    if q_index is not None:
        rows = q_index[:, None, :, None].expand(B, H, q_index.shape[1], mask.shape[-1])
        mask = torch.gather(mask, 2, rows)  # [B, H, Q, K0]
    Q, K = mask.shape[2], k_index.shape[1]
    mask = torch.gather(mask, 3, k_index[:, None, None, :].expand(B, H, Q, K))  # [B, H, Q, K]
    floating = mask.dtype.is_floating_point
    allowed = (mask > torch.finfo(mask.dtype).min / 2) if floating else mask.bool()
    allowed = allowed & k_real[:, None, None, :]
    q_pos = q_index if q_index is not None else k_index[:, -Q:]
    own = k_index[:, None, None, :] == q_pos[:, None, :, None]  # [B, 1, Q, K]
    forced = ~allowed.any(-1, keepdim=True) & own  # empty rows see their own slot
    allowed = allowed | forced
    if floating:
        kept = torch.where(forced, torch.zeros((), dtype=mask.dtype, device=mask.device), mask)
        return torch.where(allowed, kept, torch.finfo(mask.dtype).min)
    return allowed


def _window_of(layer: torch.nn.Module) -> int | None:
    attn = getattr(layer, "self_attn", None)
    window = getattr(attn, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


class TokenDropper:
    """Forward pre-hooks on decoder layers ``start..L-1`` that remove tokens chosen at prefill.

    ``select(hidden [B,N,C]) -> keep [B,N] bool | None`` is called once per prefill on layer ``start`` (None: keep
    everything for this sequence). ``handle`` is the attnkit Handle (its tracker gives padding and positions).
    """

    def __init__(self, handle, start: int, select: Callable, positions: str = "original"):
        if positions not in ("original", "contiguous"):
            raise ValueError(f"positions must be 'original' or 'contiguous', got {positions!r}")
        from attnkit.hooks.transformers import text_model_of

        self.handle = handle
        self.start = start
        self.select = select
        self.positions = positions
        self.text_model = text_model_of(handle.model)
        if self.text_model is None:
            raise ValueError("token dropping needs a decoder stack with `.layers` (none found in this model)")
        self.layers = list(self.text_model.layers)
        if not 0 <= start < len(self.layers):
            raise ValueError(f"drop layer {start} is out of range: the decoder has layers 0..{len(self.layers) - 1}")
        self.plan: KeepPlan | None = None
        self._sequence = None
        self._decoded = 0  # tokens appended after the pruned prefill (decode steps)
        #: statistics of the last prefill: tokens before / after per sample
        self.last_counts: tuple[list[int], list[int]] | None = None

    def install(self) -> list:
        hooks = [self.handle.hook(layer, self._make_hook(i), pre=True, with_kwargs=True)
                 for i, layer in enumerate(self.layers) if i >= self.start]
        # spans read by methods stacked in layers ≥ start follow the kept tokens' original positions
        layers = range(self.start, len(self.layers))
        return hooks + [self.handle.tracker.provide_key_positions(layers, self.key_positions)]

    # ---- bookkeeping --------------------------------------------------------------------------------------------
    def key_positions(self) -> torch.Tensor | None:
        """Original position of every key slot in layers ``≥ start`` (``[B, K]``), None when nothing was dropped."""
        if self.plan is None or self._sequence != self.handle.tracker.sequence_id:
            return None
        extra = torch.arange(self.plan.seq_len, self.plan.seq_len + self._decoded, device=self.plan.index.device)
        return torch.cat([self.plan.index, extra.expand(self.plan.index.shape[0], -1)], dim=1)

    def _key_real(self) -> torch.Tensor:
        """``[B, K]`` validity of the cached slots in layers ≥ start (kept prefill slots + decode tokens).

        Decode tokens are counted here rather than read from the tracker: with ``start=0`` every layer's cache is
        pruned, so a cache-length-based tracker no longer sees the original length."""
        new = torch.ones(self.plan.slot_real.shape[0], self._decoded, dtype=torch.bool, device=self.plan.index.device)
        return torch.cat([self.plan.slot_real, new], dim=1)

    # ---- the hook ---------------------------------------------------------------------------------------------
    def _make_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            if not self.handle.active:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            tracker = self.handle.tracker
            prefill = tracker.last_was_prefill
            if prefill and layer_idx == self.start:
                self.plan, self._sequence, self._decoded = None, tracker.sequence_id, 0
                if hidden.shape[1] == tracker.length:
                    keep = self.select(hidden)
                    if keep is not None:
                        self.plan = keep_plan(keep.to(hidden.device), tracker.mask("real").to(hidden.device))
                        real = tracker.mask("real")
                        self.last_counts = (real.sum(1).tolist(), self.plan.slot_real.sum(1).tolist())
                        if self.positions == "contiguous":
                            self.plan.new_pos = self._contiguous_positions()
            if self.plan is None or self._sequence != tracker.sequence_id:
                return None
            new_kwargs = dict(kwargs)
            if not prefill and layer_idx == self.start:
                self._decoded += hidden.shape[1]
            if prefill:
                if layer_idx == self.start:
                    hidden = _gather_seq(hidden, self.plan.index, 1)  # [B, N', C]
                new_kwargs.update(self._prefill_kwargs(kwargs, hidden))
            else:
                new_kwargs.update(self._decode_kwargs(kwargs, hidden))
            new_args = (hidden,) + tuple(args[1:]) if args else ()
            if not args:
                new_kwargs["hidden_states"] = hidden
            new_kwargs["attention_mask"] = self._mask(kwargs.get("attention_mask"), hidden, layer_idx, prefill)
            return new_args, new_kwargs

        return hook

    def _contiguous_positions(self) -> torch.Tensor:
        real = self.plan.slot_real.long()
        return (real.cumsum(1) - 1).clamp_min(0)  # [B, N']

    def _prefill_kwargs(self, kwargs: dict, hidden: torch.Tensor) -> dict:
        cache = self.plan.cache
        if cache.get("forward") != self.handle.tracker.forward_index:
            cache.clear()
            cache["forward"] = self.handle.tracker.forward_index
            out = {}
            pos = kwargs.get("position_ids")
            if self.positions == "contiguous":
                out.update(self._recompute_positions(hidden, self.plan.new_pos, kwargs))
            else:
                if isinstance(pos, torch.Tensor):
                    out["position_ids"] = _gather_seq(pos, self.plan.index, -1)
                emb = kwargs.get("position_embeddings")
                if isinstance(emb, tuple):
                    out["position_embeddings"] = tuple(_gather_seq(t, self.plan.index, -2) for t in emb)
            cache["kwargs"] = out
        return cache["kwargs"]

    def _decode_kwargs(self, kwargs: dict, hidden: torch.Tensor) -> dict:
        """Decode steps keep the model's absolute positions, except in contiguous mode (shifted by the drops)."""
        if self.positions != "contiguous":
            return {}
        q_len = hidden.shape[1]
        first_new = self._decoded - q_len  # index of this call's first token among the new ones
        kept = self.plan.slot_real.sum(1, keepdim=True).to(hidden.device)  # [B, 1]
        pos = kept + torch.arange(first_new, first_new + q_len, device=hidden.device)  # [B, Q]
        return self._recompute_positions(hidden, pos, kwargs)

    def _recompute_positions(self, hidden, pos: torch.Tensor, kwargs: dict) -> dict:
        """New (cos, sin) for re-indexed positions, through the model's rotary embedding."""
        rotary = getattr(self.text_model, "rotary_emb", None)
        if rotary is None:
            raise ValueError("positions='contiguous' needs a rotary embedding (`rotary_emb`) on the decoder")
        pos = pos.to(hidden.device)
        out = {"position_ids": pos, "position_embeddings": rotary(hidden, position_ids=pos)}
        return out

    def _mask(self, like, hidden, layer_idx: int, prefill: bool):
        q_len = hidden.shape[1]
        if prefill:
            k_pos = self.plan.index  # [B, N']
            k_real = self.plan.slot_real
            q_pos = k_pos
        else:
            k_pos = self.key_positions().to(hidden.device)  # [B, K]
            k_real = self._key_real().to(hidden.device)
            q_pos = k_pos[:, -q_len:]
        total = self.plan.seq_len + self._decoded  # original positions seen so far
        if isinstance(like, torch.Tensor) and like.dim() == 4 and like.shape[-1] == total:
            # the model built its own mask over the original positions (bidirectional image blocks, prefix or
            # chunked attention, sliding windows, padding): take it at the kept slots instead of rebuilding it
            rows = q_pos if prefill else None
            return gather_mask(like, rows, k_pos.to(like.device), k_real.to(like.device))
        window = _window_of(self.layers[layer_idx])
        sdpa_format = not isinstance(like, torch.Tensor) or like.dtype == torch.bool
        square_or_row = q_len == 1 or q_len == k_pos.shape[1]
        if sdpa_format and window is None and square_or_row and bool(k_real.all()):
            # kept slots are in original order and all real: plain causal over slots, so SDPA can take its
            # is_causal fast path (None = causal for a square prefill, everything visible for decode rows)
            return None
        dtype = like.dtype if isinstance(like, torch.Tensor) else torch.bool
        return build_mask(q_pos, k_pos, k_real.to(k_pos.device), like if isinstance(like, torch.Tensor) else None,
                          dtype, window=window)


def top_fraction_keep(scores: torch.Tensor, candidates: torch.Tensor, keep_ratio: float | None = None,
                      keep_count: int | None = None) -> torch.Tensor:
    """Per sample, keep the top ``round(n·keep_ratio)`` (or ``keep_count``) candidates by score; every
    non-candidate is kept. Ties go to the earlier token (stable sort). scores/candidates ``[B, N]`` → keep ``[B, N]``.

    Example:
        >>> s = torch.tensor([[0.0, 0.05, 0.20, 0.01, 0.10, 0.30, 0.02, 0.0]])
        >>> cand = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
        >>> top_fraction_keep(s, cand, keep_ratio=0.5).int().tolist()
        [[1, 0, 1, 0, 1, 1, 0, 1]]
    """
    keep = ~candidates
    masked = torch.where(candidates, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = masked.argsort(dim=1, descending=True, stable=True)  # [B, N]
    for b in range(scores.shape[0]):
        n = int(candidates[b].sum())
        k = keep_count if keep_count is not None else int(n * keep_ratio + 0.5)  # round half up
        k = max(0, min(n, k))
        keep[b, order[b, :k]] = True
    return keep
