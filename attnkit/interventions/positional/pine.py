"""PINE — Eliminating Position Bias of Language Models: A Mechanistic Approach (Wang et al., ICLR 2025,
arXiv 2407.01100; repo wzq016/PINE), METHODS-2.md §3.

Segments that should be order-invariant (documents, options) get two changes in every layer and head:

* **bidirectional attention between segments** — the model's mask is replaced so that a segment's tokens see every
  other segment (``override_mask``; inside a segment attention stays causal);
* **per-query position re-assignment by importance** — for each query the other segments are placed, by how much
  the query attends to them *without* position encoding, more attended = closer (``edit_output`` recomputes the
  rows over the call's post-RoPE q/k moved with :class:`attnkit.rope.Rotary` shifts: no pre-RoPE copy is kept).

Rule (released code, ``pine/models/llama/modeling_llama.py``): input ``[prefix, D_1 … D_n, suffix]``.

* **Stacked default positions:** the prefix keeps ``0..P−1``; every segment is right-aligned at
  ``[P+T_d−ℓ_k, P+T_d)`` (``T_d = Σℓ``); the suffix and generated tokens continue at ``P+T_d, …``.
* **Prefix rows:** ordinary causal attention.
* **Segment rows of ``D_k``:** importance ``M(k, k') = Σ_{i∈D_k} Σ_{j∈D_k'} A_ij / ℓ_k'`` from no-RoPE scores
  ``q_i·k_j/√d`` over the segment region with the own segment masked (no causal mask), softmax over the region; the
  own segment ranks first, the others by ``M`` descending (stable: ties keep input order); the shift of a segment is
  the total length of those ranked before it; keys sit at their stacked position minus the shift, the queries at
  their stacked positions. Two segments need no importance (each sees the other shifted by its own length).
* **Suffix and decode rows:** per query and head, ``m_i(s) = Σ_{j∈D_s} A_ij / ℓ_s`` (no RoPE, softmax over the
  segment region), segments sorted by ``m`` descending; the most attended is shifted by 0 (next to the suffix), the
  next by its length, …; attention over every key with the model's causal mask.
* Order per **query head** (GQA keys are read per query head); importance in fp32.

Segments come from the user span ``pine_segments`` (``handle.set_span("pine_segments", [[(s0, e0), (s1, e1), …]])``,
one list of adjacent ranges per sample; :func:`pine_inputs` builds ids and ranges in the released tokenisation:
prefix with special tokens, each segment and the suffix encoded separately). A bool span is split into its
contiguous runs. ``split`` cuts every range into that many equal consecutive segments (e.g. fixed-size options).
``reposition=False`` keeps only the bidirectional mask (an ablation); ``bidirectional=False`` only the positions.
Batched inputs and left padding are supported (positions are per sample); the released code is batch 1, eager,
Llama/Qwen2. On sliding-window layers (Gemma-3) the cross-segment blocks stay visible whatever the window, and a
suffix row's importance is taken over the segment keys its window shows.

Example (METHODS-2.md §3.4 two-segment case: P = 2, X (ℓ=2), Y (ℓ=3)):
    >>> stacked_shift([2, 3])              # stacked − concatenated position per segment: X moves by ℓ_Y
    [3, 0]
    >>> reassigned_positions(P=2, lengths=[2, 3], order=[0, 1])      # X's queries: X at [5,6], Y shifted by 2
    [[5, 6], [2, 3, 4]]
    >>> reassigned_positions(P=2, lengths=[2, 3], order=[1, 0])      # Y's queries: Y at [4,5,6], X shifted by 3
    [[2, 3], [4, 5, 6]]
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, MaskBlock, register_intervention
from attnkit.interventions.kvcache._sparse import expand_kv, key_indices, key_rope_positions, masked_softmax, \
    real_keys, scaling_of, softcap_of, visible
from attnkit.rope import Rotary, rotary_for
from attnkit.targets import parse_layers

SPAN = "pine_segments"


# ---- positions --------------------------------------------------------------------------------------------------------
def stacked_shift(lengths: list[int]) -> list[int]:
    """How far each segment moves from its concatenated position to its stacked (right-aligned) one: the total
    length of the segments after it."""
    return [sum(lengths[k + 1:]) for k in range(len(lengths))]


def shifts_from_order(lengths: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Shift of every segment given a ranking (``order[r]`` = segment at rank r): the total length of the segments
    ranked before it. lengths ``[n]``, order ``[..., n]`` → ``[..., n]``.

    Example (§3.4 suffix query: order B, C, A with ℓ = (2, 1, 3) → shifts A 4, B 0, C 1):
        >>> shifts_from_order(torch.tensor([2, 1, 3]), torch.tensor([1, 2, 0])).tolist()
        [4, 0, 1]
    """
    ranked = lengths.to(order.device).expand(order.shape).gather(-1, order)  # [..., n] lengths in rank order
    before = ranked.cumsum(-1) - ranked  # [..., n] exclusive prefix sums
    return torch.zeros_like(before).scatter_(-1, order, before)


def reassigned_positions(P: int, lengths: list[int], order: list[int]) -> list[list[int]]:
    """Each segment's positions for a query whose ranking is ``order`` (``order[0]`` the query's own segment for a
    segment row): stacked position minus the shift."""
    total = sum(lengths)
    shifts = shifts_from_order(torch.tensor(lengths), torch.tensor(order)).tolist()
    return [[P + total - lengths[k] - shifts[k] + t for t in range(lengths[k])] for k in range(len(lengths))]


def importance_order(mean_attention: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
    """Rank segments by ``mean_attention [..., n]`` descending, ties in input order; ``own`` (long ``[...]``) ranks
    first. → ``order [..., n]``.

    Example (§3.4: suffix means A .10, B .35, C .15 → B, C, A; segment A's M(A,B)=.5, M(A,C)=.2 → A, B, C):
        >>> importance_order(torch.tensor([0.10, 0.35, 0.15])).tolist()
        [1, 2, 0]
        >>> importance_order(torch.tensor([0.0, 0.5, 0.2]), own=torch.tensor(0)).tolist()
        [0, 1, 2]
    """
    values = mean_attention.float()
    if own is not None:
        values = values.scatter(-1, own.long()[..., None], float("inf"))
    return values.sort(dim=-1, descending=True, stable=True).indices


# ---- inputs -----------------------------------------------------------------------------------------------------------
def pine_inputs(tokenizer, prefix: str, segments: list[str], suffix: str) -> tuple[torch.Tensor, list]:
    """``(input_ids [1, N], ranges [[(start, end), …]])`` in the released tokenisation: the prefix with special tokens,
    each segment and the suffix encoded separately without them, then concatenated."""
    ids = list(tokenizer(prefix)["input_ids"])
    ranges = []
    for text in segments:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not part:
            raise ValueError(f"pine: segment {text!r} encodes to no token")
        ranges.append((len(ids), len(ids) + len(part)))
        ids += part
    ids += tokenizer(suffix, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids]), [ranges]


def segment_ids(spec, batch: int, length: int, split: int = 1) -> torch.Tensor:
    """Long ``[B, N]``: 0 outside segments, ``k+1`` on segment ``k`` of each sample, from a span given as per-sample
    ``(start, end)`` ranges or a bool ``[B, N]`` tensor (contiguous runs); every range cut into ``split`` parts.

    Example:
        >>> segment_ids([[(1, 3), (3, 4)]], 1, 5).tolist()
        [[0, 1, 1, 2, 0]]
        >>> segment_ids([[(1, 5)]], 1, 6, split=2).tolist()
        [[0, 1, 1, 2, 2, 0]]
    """
    if isinstance(spec, torch.Tensor):
        runs = []
        for row in spec.bool().cpu():
            idx = row.nonzero().flatten().tolist()
            sample, start = [], None
            for a, b in zip(idx, idx[1:] + [None]):
                start = a if start is None else start
                if b != a + 1:
                    sample.append((start, a + 1))
                    start = None
            runs.append(sample)
        spec = runs
    if len(spec) != batch:
        raise ValueError(f"pine: segments given for {len(spec)} samples but the batch has {batch}")
    ids = torch.zeros(batch, length, dtype=torch.long)
    for b, ranges in enumerate(spec):
        k = 0
        for start, end in sorted(ranges):
            bounds = [start + round(i * (end - start) / split) for i in range(split + 1)]
            for s, e in zip(bounds, bounds[1:]):
                if e > s:
                    k += 1
                    ids[b, s:e] = k
    return ids


# ---- scores with per-group query rotations ------------------------------------------------------------------------------
def shifted_scores(q: torch.Tensor, k: torch.Tensor, groups: torch.Tensor, sigma: torch.Tensor, rot: Rotary,
                   scaling: float) -> torch.Tensor:
    """Scores ``[H, R, K]`` of post-RoPE q ``[H, R, D]`` and k ``[H, K, D]`` where key group ``g`` (``groups [K]``) is moved
    by ``sigma [H, R, G]`` positions relative to each query: ``q_i·R(σ)k_j = (R(−σ)q_i)·k_j`` (RoPE is relative), so
    the queries are rotated once per group and no key is copied."""
    scores = torch.empty(q.shape[0], q.shape[1], k.shape[1], device=q.device)
    for g in range(sigma.shape[-1]):
        sel = groups == g  # [K]
        if not bool(sel.any()):
            continue
        q_g = rot.shift(q, -sigma[..., g]).float()  # [H, R, D]
        scores[:, :, sel] = torch.einsum("hrd,hkd->hrk", q_g, k[:, sel].float())
    return scores * scaling


@register_intervention
class PINE(Intervention):
    name = "pine"
    description = "PINE: bidirectional attention between segments, positions re-assigned by attention importance"
    requires = frozenset({"text_decoder", "rope", f"span:{SPAN}"})
    conformance = {"neutral": {"split": 1}, "active": {"split": 3}}

    def __init__(self, split: int = 1, reposition: bool = True, bidirectional: bool = True, span: str = SPAN,
                 **target):
        if target.get("heads") is not None:
            raise ValueError("pine: it applies to every head of the targeted layers; do not pass heads")
        if isinstance(split, bool) or not isinstance(split, int) or split < 1:
            raise ValueError(f"pine: split must be an int ≥ 1, got {split!r}")
        if not (reposition or bidirectional):
            raise ValueError("pine: with reposition=False and bidirectional=False nothing would change")
        super().__init__(**target)
        self.split, self.reposition, self.bidirectional, self.span = split, bool(reposition), bool(bidirectional), span
        #: the last prefill's segment ranking of the last suffix query, per layer: ``{layer: order [B, H, n]}``
        self.last_orders: dict = {}

    def install(self, handle) -> list:
        self._model = handle.model
        layers = parse_layers(self.target.layers, handle.description.component("text").num_layers)  # any layer spec
        self._rotary = {} if not self.reposition else {
            layer: rotary_for(handle.model, layer, self.name) for layer in layers}
        return []

    # ---- segments of this sequence ---------------------------------------------------------------------------------
    def _segments(self, ctx) -> torch.Tensor:
        """Long ``[B, K]`` segment ids of this call's keys (kept per layer from the prefill, over sequence positions:
        a cache holding a window of the sequence reads its own keys)."""
        state = ctx.state
        if ctx.is_prefill or "seg" not in state:
            if ctx.tracker is not None and ctx.tracker.length != ctx.k_len:
                raise ValueError("pine: the prefill's keys do not cover the tracked sequence (a pruned cache?)")
            spec = ctx.tracker.user_spans.get(self.span) if ctx.tracker is not None else None
            if spec is None:
                raise KeyError(f"pine needs its segments: handle.set_span({self.span!r}, [[(start, end), ...]]) "
                               "before the prefill")
            ids = segment_ids(spec, ctx.batch, ctx.k_len, self.split).to(ctx.device)
            ids = ids * real_keys(ctx)  # padding is never a segment
            for b in range(ctx.batch):
                where = (ids[b] > 0).nonzero().flatten()
                if where.numel() and int(where[-1] - where[0] + 1) != where.numel():
                    raise ValueError("pine: the segments of a sample must be adjacent ([prefix, segments…, suffix])")
            state["seg"] = ids
        seg = state["seg"]
        if ctx.tracker is None:
            return torch.nn.functional.pad(seg, (0, ctx.k_len - seg.shape[1]))
        seg = torch.nn.functional.pad(seg, (0, ctx.tracker.length - seg.shape[1]))  # generated tokens: no segment
        return ctx.keys_of(seg.cpu()).to(ctx.device)

    # ---- the mask -----------------------------------------------------------------------------------------------------
    def override_mask(self, ctx):
        if not self.bidirectional:
            return None
        seg = self._segments(ctx)  # [B, K]
        n = int(seg.max())
        if n < 2:
            return None
        q_seg = seg[:, ctx.k_len - ctx.q_len:]  # [B, Q]
        region = seg > 0
        return [MaskBlock(q_seg == s, region & (seg != s)) for s in range(1, n + 1)]

    # ---- the positions ------------------------------------------------------------------------------------------------
    def edit_output(self, out, ctx):
        if not self.reposition:
            return out
        seg = self._segments(ctx)  # [B, K]
        if int(seg.max()) < 2:
            return out
        out = out.clone()
        allowed = visible(ctx)  # [B, 1, Q, K] the model's mask with the segment blocks
        positions = key_rope_positions(ctx)  # [B, K]
        orders = []
        where = key_indices(ctx)  # [B, K] sequence positions of the keys
        for b in range(ctx.batch):
            full = ctx.state["seg"][b]  # [T0] the prefill's segment ids over sequence positions
            lengths = torch.stack([(full == s).sum() for s in range(1, int(full.max()) + 1)]) \
                if int(full.max()) >= 2 else None
            if lengths is None or not bool((seg[b] > 0).any()):
                continue  # fewer than two segments, or every segment key outside this layer's window
            last_seg = int((full > 0).nonzero().max())  # sequence position of the last segment token
            result = self._sample(ctx, b, seg[b], positions[b], allowed[b, 0], lengths,
                                  where[b, ctx.k_len - ctx.q_len:] > last_seg)
            if result is not None:
                rows, values, order = result
                out[b, :, rows] = values.to(out.dtype)
                orders.append(order)
        if ctx.is_prefill and orders and all(o is not None for o in orders) and \
                len({tuple(o.shape) for o in orders}) == 1:
            self.last_orders[ctx.layer] = torch.stack(orders)
        return out

    def _sample(self, ctx, b: int, seg: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor,
                lengths: torch.Tensor, after: torch.Tensor):
        """Recompute the segment, suffix and decode rows of sample ``b`` → (call rows, ``[H, R, D]``, last order).
        seg/pos ``[K]`` of this call's keys, ``lengths [n]`` the segments' full lengths, ``after [Q]`` the rows that
        follow the segments."""
        n = lengths.numel()
        rot, H = self._rotary[ctx.layer], ctx.num_heads
        scaling, softcap = scaling_of(ctx), softcap_of(ctx)
        first_row = ctx.k_len - ctx.q_len
        q = ctx.query[b].float()  # [H, Q, D]
        k = expand_kv(ctx.key[b:b + 1], H)[0].float()  # [H, K, D]
        v = expand_kv(ctx.value[b:b + 1], H)[0].float()
        lengths = lengths.to(q.device)
        region = seg > 0  # [K]
        stack = torch.tensor(stacked_shift(lengths.tolist()), device=q.device, dtype=torch.float32)  # [n]
        # no-RoPE tensors of the segment region, for the importance scores
        k_raw = rot.unrotate(k[:, region], pos[region][None].expand(H, -1)).float()  # [H, T_d, D]
        seg_region = seg[region] - 1  # [T_d] 0-based segment of each region key
        onehot = torch.nn.functional.one_hot(seg_region, n).float() / lengths.float()  # [T_d, n] mean weights
        groups = seg  # [K] group 0: prefix/suffix/generated, g: segment g
        rows_out, values_out, last_order = [], [], None
        call_seg = seg[first_row:]  # [Q]
        real = real_keys(ctx)[b, first_row:]
        # segment rows (prefill): one ranking per (query segment, head)
        for s in range(1, n + 1):
            rows = ((call_seg == s) & real).nonzero().flatten()  # [R]
            if rows.numel() == 0:
                continue
            own = s - 1
            if n > 2:
                q_raw = rot.unrotate(q[:, rows], pos[first_row + rows][None].expand(H, -1)).float()  # [H, R, D]
                scores = torch.einsum("hrd,hkd->hrk", q_raw, k_raw) * scaling  # [H, R, T_d]
                probs = masked_softmax(scores, (seg_region != own)[None, None])  # [H, R, T_d]
                M = (probs @ onehot).sum(1)  # [H, n]
            else:
                M = torch.zeros(H, n, device=q.device)
            order = importance_order(M, torch.full((H,), own, device=q.device))  # [H, n]
            shift = shifts_from_order(lengths, order).float()  # [H, n]
            delta_k = stack[None] - shift  # [H, n] key moves per segment
            sigma = torch.cat([torch.zeros(H, 1, device=q.device), delta_k], -1) - stack[own]  # [H, G]
            rows_out.append(rows)
            values_out.append(self._attend(q[:, rows], k, v, groups, sigma[:, None].expand(-1, rows.numel(), -1),
                                           allowed[rows], rot, scaling, softcap))
        # suffix and decode rows: one ranking per (query, head)
        rows = (after & real).nonzero().flatten()
        if rows.numel():
            q_raw = rot.unrotate(q[:, rows], pos[first_row + rows][None].expand(H, -1)).float()  # [H, R, D]
            seen = allowed[rows][:, region]  # [R, T_d] region keys each row may see (a sliding window may hide some)
            probs = masked_softmax(torch.einsum("hrd,hkd->hrk", q_raw, k_raw) * scaling, seen[None])  # [H, R, T_d]
            means = probs @ onehot  # [H, R, n]
            order = importance_order(means)  # [H, R, n]
            shift = shifts_from_order(lengths, order).float()
            sigma = torch.cat([torch.zeros(H, rows.numel(), 1, device=q.device), stack - shift], -1)  # [H, R, G]
            rows_out.append(rows)
            values_out.append(self._attend(q[:, rows], k, v, groups, sigma, allowed[rows], rot, scaling, softcap))
            last_order = order[:, -1]
        if not rows_out:
            return None
        return torch.cat(rows_out), torch.cat(values_out, dim=1), last_order

    @staticmethod
    def _attend(q, k, v, groups, sigma, allowed, rot, scaling, softcap):
        """Rows ``q [H, R, D]`` over all keys with key group moves ``sigma [H, R, G]`` → ``[H, R, D]``."""
        scores = shifted_scores(q, k, groups, sigma, rot, scaling)  # [H, R, K]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        return masked_softmax(scores, allowed[None]) @ v  # [H, R, D]
