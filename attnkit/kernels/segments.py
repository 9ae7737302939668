"""Per-group attention partials from a few fused SDPA calls: the span decomposition behind the ``torch`` backend.

For one sample, the keys of a group ``g`` form *runs* (maximal contiguous stretches; padding is in no group).
Runs of one group separated by a short gap of other keys are merged into one *segment* ``[s, e)`` whose gap
columns are hidden by an additive column mask ``[1, 1, 1, e - s]`` (O(K) memory: the fused CPU kernel takes it
together with ``is_causal``). Queries are the last ``Q`` of the ``K`` key positions. A segment is covered by at most
three fused calls, each returning ``(out, lse)``:

* queries inside it: one causal call on its square part, plus one non-causal call on the part before the first
  query when the queries are a suffix (``Q < K``);
* queries after it: one non-causal call on the whole segment.

Segments shorter than :data:`TINY` keys (scattered sink tokens, a BOS token) are not worth a fused call: the keys of
all such groups are gathered and computed explicitly in one pass, ``[H, C, S]`` scores for a chunk of ``C`` queries
and ``S`` such keys, kept factored (:class:`ExplicitBlock`) until the groups are combined.

Partials of one group from several calls whose query rows overlap stay separate pieces, each counted with its share
of the group (:class:`GroupPieces`). Work is about one causal attention pass in total, plus the masked gap columns.

Example:
    >>> import torch
    >>> plan = plan_segments([(0, 1, 1), (1, 40, 0), (40, 41, 1), (41, 90, 2), (90, 91, 1), (91, 99, 2)], 99)
    >>> [(seg.group, seg.start, seg.end, seg.holes) for seg in plan.segments]
    [(0, 1, 40, 0), (2, 41, 99, 1)]
    >>> {g: idx.tolist() for g, idx in plan.explicit.items()}
    {1: [0, 40, 90]}
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from attnkit.kernels.masks import query_chunk

__all__ = ["plan_segments", "sample_partials", "GroupPieces", "ExplicitBlock", "attention_lse", "merge_partial",
           "TINY", "MERGE_GAP"]

#: segments with fewer keys than this are computed explicitly (gathered keys), not by fused calls
TINY = 16
#: runs of one group whose gap is at most ``max(MERGE_GAP, merged length // 8)`` keys share one segment
MERGE_GAP = 32


# --------------------------------------------------------------------------------------------------------
# fused (out, lse) of one block of queries on one block of keys
# --------------------------------------------------------------------------------------------------------
def _math_attention_lse(q, k, v, causal: bool, scale: float, bias: torch.Tensor | None = None):
    """(out, lse) of attention of ``q [B,H,Q,D]`` on ``k,v [B,H,K,D]`` with top-left causal alignment and an
    optional additive ``bias`` broadcastable to ``[B,H,Q,K]``; query-chunked math (memory O(chunk·K)): the
    device-independent stand-in for the CPU fused kernel. Rows with no allowed key: out 0, lse -inf."""
    B, H, Q, D = q.shape
    K = k.shape[2]
    out = torch.empty(B, H, Q, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, Q, dtype=torch.float32, device=q.device)
    C = query_chunk(B, H, Q, K)
    kf, vf = expand_kv(k, H).float(), expand_kv(v, H).float()
    for c0 in range(0, Q, C):
        c1 = min(Q, c0 + C)
        s = torch.matmul(q[:, :, c0:c1].float(), kf.transpose(-1, -2)) * scale  # [B,H,C,K]
        if bias is not None:
            s = s + (bias[:, :, c0:c1] if bias.shape[2] > 1 else bias).float()
        if causal:
            s = s.masked_fill(torch.arange(K, device=q.device)[None] > torch.arange(c0, c1, device=q.device)[:, None],
                              float("-inf"))
        l = torch.logsumexp(s, dim=-1)  # [B,H,C]
        safe = torch.where(torch.isinf(l), 0.0, l)
        out[:, :, c0:c1] = torch.matmul(torch.exp(s - safe.unsqueeze(-1)), vf)
        lse[:, :, c0:c1] = l
    return out, lse


@functools.lru_cache(maxsize=None)
def native_gqa() -> bool:
    """Whether the fused CPU kernel takes fewer K/V heads than query heads itself (torch 2.13 does): then K and V are
    never copied per query head. Probed once on a tiny input."""
    q, kv = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    try:
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv, 0.0, True, scale=0.5)
    except (RuntimeError, ValueError):
        return False
    ref = torch.nn.functional.scaled_dot_product_attention(q, kv.expand(1, 2, 3, 4), kv.expand(1, 2, 3, 4),
                                                           is_causal=True, scale=0.5)
    return bool(torch.allclose(out, ref, atol=1e-6))


def expand_kv(x: torch.Tensor, H: int) -> torch.Tensor:
    """``[B,Hkv,K,D]`` → ``[B,H,K,D]`` (a copy only for GQA)."""
    B, Hkv, K, D = x.shape
    return x if Hkv == H else x.unsqueeze(2).expand(B, Hkv, H // Hkv, K, D).reshape(B, H, K, D)


def attention_lse(q, k, v, causal: bool, scale: float, bias: torch.Tensor | None = None):
    """(out fp32 ``[B,H,Q,D]``, lse fp32 ``[B,H,Q]``) of attention with top-left causal alignment and an optional
    additive ``bias`` broadcastable to ``[B,H,Q,K]`` (q's dtype); the fused kernel on CPU. ``k, v`` may have fewer
    heads (GQA, ``[B,Hkv,K,D]``): the kernel reads them in place where it can (:func:`native_gqa`).

    Rows whose every key is masked are the caller's business (the fused kernel returns lse 0 there).

    Example:
        >>> q = k = v = torch.randn(1, 2, 3, 4)
        >>> out, lse = attention_lse(q, k, v, True, 0.5)
        >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5),
        ...                atol=1e-6)
        True
    """
    if k.shape[1] != q.shape[1] and (q.device.type != "cpu" or not native_gqa()):
        k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=None if bias is None else bias.to(q.dtype), scale=scale)
        return out.float(), lse.float()
    return _math_attention_lse(q, k, v, causal, scale, bias)


def merge_partial(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: fold a partial ``(out [...,D], lse [...])`` into the accumulator (exact log-sum-exp merge).

    Example:
        >>> acc, lacc = torch.tensor([[1.0, 0.0]]), torch.tensor([0.0])
        >>> merge_partial(acc, lacc, torch.tensor([[0.0, 1.0]]), torch.tensor([0.0]))
        >>> acc.tolist(), round(float(lacc), 4)
        ([[0.5, 0.5]], 0.6931)
    """
    new = torch.logaddexp(lse_acc, lse)  # [...]
    safe = torch.where(torch.isinf(new), 0.0, new)
    w_old = torch.exp(lse_acc - safe).unsqueeze(-1)  # exp(-inf) = 0
    w_new = torch.exp(lse - safe).unsqueeze(-1)
    out_acc.mul_(w_old).add_(out * w_new)
    lse_acc.copy_(new)


# --------------------------------------------------------------------------------------------------------
# planning: runs -> segments + explicit keys
# --------------------------------------------------------------------------------------------------------
@dataclass
class Segment:
    group: int
    start: int
    end: int
    holes: int = 0  # keys of other groups (or padding) inside [start, end)
    member: torch.Tensor | None = None  # [end - start] bool, True = key of `group` (None when holes == 0)


@dataclass
class Plan:
    segments: list = field(default_factory=list)  # Segment
    explicit: dict = field(default_factory=dict)  # group -> LongTensor of key indices (sorted)


def plan_segments(runs: list[tuple[int, int, int]], K: int) -> Plan:
    """Segments and explicitly computed keys of one sample from its runs ``(start, end, group)`` (sorted by start,
    padding excluded): runs of a group are merged across gaps of ≤ ``max(MERGE_GAP, length // 8)`` keys; segments
    shorter than :data:`TINY` keys go to the explicit set."""
    by_group: dict[int, list[tuple[int, int]]] = {}
    for s, e, g in runs:
        by_group.setdefault(g, []).append((s, e))
    plan = Plan()
    for g, spans in by_group.items():
        merged: list[list[tuple[int, int]]] = [[spans[0]]]
        for s, e in spans[1:]:
            first, last = merged[-1][0][0], merged[-1][-1][1]
            if s - last <= max(MERGE_GAP, (e - first) // 8):
                merged[-1].append((s, e))
            else:
                merged.append([(s, e)])
        tiny: list[int] = []
        for parts in merged:
            start, end = parts[0][0], parts[-1][1]
            size = sum(e - s for s, e in parts)
            if end - start < TINY:
                for s, e in parts:
                    tiny.extend(range(s, e))
                continue
            member = None
            if size < end - start:
                member = torch.zeros(end - start, dtype=torch.bool)
                for s, e in parts:
                    member[s - start:e - start] = True
            plan.segments.append(Segment(g, start, end, end - start - size, member))
        if tiny:
            plan.explicit[g] = torch.tensor(tiny, dtype=torch.long)
    plan.segments.sort(key=lambda seg: (seg.start, seg.group))
    return plan


def segment_calls(start: int, end: int, Q: int, K: int, causal: bool):
    """The fused calls covering keys ``[start, end)``: ``(query rows (r0, r1), keys (k0, k1), causal)`` triples."""
    P0 = K - Q  # absolute position of query 0
    if not causal:
        return [((0, Q), (start, end), False)]
    if start >= P0:  # no query before the segment: one top-left causal call, later rows see all of its keys
        return [((start - P0, Q), (start, end), True)]
    calls = []
    d0 = max(start, P0)
    if d0 < end:  # queries inside the segment: the causal square, plus its keys before the first query
        calls.append(((d0 - P0, end - P0), (d0, end), True))
        if start < d0:
            calls.append(((d0 - P0, end - P0), (start, d0), False))
    a0 = max(end, P0)
    if a0 < K:  # queries after the segment see all of it
        calls.append(((a0 - P0, Q), (start, end), False))
    return calls


# --------------------------------------------------------------------------------------------------------
# running one sample
# --------------------------------------------------------------------------------------------------------
class ExplicitBlock:
    """The tiny groups' partials for a block of query rows, kept factored: ``e [H,r,S]`` the unnormalised
    probabilities (one shared row maximum) over the ``S`` gathered keys of those groups, ``v [Hkv,S,D]`` their
    values, ``slot [S]`` each key's position in ``groups``, ``z [H,r,G_e]`` the per-group sums and ``lse [H,r,G_e]``.
    ``O_g = (e · [slot = g]) @ v / z_g``; a weighted sum over the groups is one product ``(e · w_slot / z_slot) @ v``.
    """

    def __init__(self, e, v, slot, groups, z, lse):
        self.e, self.v, self.slot, self.groups, self.z, self.lse = e, v, slot, groups, z, lse

    def _product(self, key_scale: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """``(e · key_scale) @ v`` → ``[H,r,D]``; ``key_scale`` broadcastable to ``e``. With ``into`` (``[H,r,D]``)
        the product is written there, straight from the matrix product when ``into`` is contiguous."""
        H, r, S = self.e.shape
        Hkv = self.v.shape[0]
        scaled = (self.e * key_scale).reshape(Hkv, (H // Hkv) * r, S)  # [Hkv, R*r, S]
        if into is not None and into.is_contiguous():
            torch.bmm(scaled, self.v, out=into.view(Hkv, (H // Hkv) * r, -1))  # [Hkv, R*r, D]
            return into
        prod = torch.matmul(scaled, self.v).view(H, r, -1)
        return prod if into is None else into.copy_(prod)

    def _inverse_z(self) -> torch.Tensor:
        return torch.where(self.z > 0, self.z, 1.0).reciprocal()  # [H,r,G_e]; groups with z = 0 have e = 0

    def output(self, i: int) -> torch.Tensor:
        """``O`` of the i-th group ``[H,r,D]``."""
        return self._product((self.slot == i).to(self.e.dtype) * self._inverse_z()[..., i:i + 1])

    def weighted(self, w: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_i w_{g_i} O_{g_i}`` → ``[H,r,D]`` for the rows' group weights ``w [H,r,G]`` (written to ``into``
        when given, see :meth:`_product`)."""
        per_group = w[..., self.groups] * self._inverse_z()  # [H,r,G_e]
        return self._product(per_group.index_select(-1, self.slot), into)  # [H,r,S] key scales


class GroupPieces:
    """Per-group partials of a batch kept as the pieces the fused calls returned, without a ``[B,H,Q,G,D]`` buffer.

    ``lse [B,G,H,Q]`` is complete (-inf where a group has no visible key); for each ``(sample, group)`` query-row
    ranges ``[r0, r1)`` carry a within-group output ``[H, r1-r0, D]`` fp32 and its log-sum-exp (rows outside every
    range: ``O_g = 0``). Pieces of one group may overlap (a group's keys split over several calls): each then counts
    with its share ``exp(lse_piece − lse_g)`` of the group, so no piece is rewritten when another arrives.
    :meth:`weighted_sum` combines groups straight from the pieces; :meth:`out_g` materialises the buffer.

    Example:
        >>> pieces = GroupPieces(1, 2, 1, 3, 2, "cpu")
        >>> pieces.add(0, 0, 0, 3, torch.ones(1, 3, 2), torch.zeros(1, 3))
        >>> pieces.add(0, 1, 1, 3, torch.full((1, 2, 2), 3.0), torch.zeros(1, 2))
        >>> pieces.weighted_sum(torch.ones(1, 1, 3, 2))[0, 0].tolist()
        [[1.0, 1.0], [4.0, 4.0], [4.0, 4.0]]
        >>> pieces.add(0, 0, 2, 3, torch.full((1, 1, 2), 3.0), torch.zeros(1, 1))   # more keys of group 0, row 2
        >>> pieces.out_g()[0, 0, :, 0].tolist()                                     # row 2: half of each
        [[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]]
    """

    def __init__(self, B: int, G: int, H: int, Q: int, D: int, device):
        self.shape = (B, H, Q, G, D)
        self.lse = torch.full((B, G, H, Q), float("-inf"), dtype=torch.float32, device=device)  # [B,G,H,Q]
        self.pieces: dict[tuple[int, int], list] = {}  # (b, g) -> [(r0, r1, out [H,r,D], lse [H,r]), ...]
        self.overlapping: set[tuple[int, int]] = set()  # (b, g) whose pieces share rows
        self.blocks: list[tuple] = []  # (b, r0, r1, ExplicitBlock): tiny groups of one sample, kept factored
        self.device = device

    def add_block(self, b: int, r0: int, r1: int, block: "ExplicitBlock") -> None:
        """Add the tiny groups' partials of rows ``[r0, r1)`` of sample ``b``. No other partial of those groups may
        cover these rows (:func:`sample_partials` sends groups that also have segments through :meth:`add`), and the
        blocks of one sample cover disjoint rows (one block per query chunk)."""
        self.blocks.append((b, r0, r1, block))
        for i, g in enumerate(block.groups):
            self.lse[b, g, :, r0:r1] = block.lse[..., i]

    def add(self, b: int, g: int, r0: int, r1: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Add the partial ``out [H,r,D]``, ``lse [H,r]`` of rows ``[r0, r1)`` of group ``g`` of sample ``b``."""
        have = self.pieces.setdefault((b, g), [])
        lse_bg = self.lse[b, g]  # [H,Q]
        if any(a < r1 and r0 < e for a, e, _, _ in have):
            self.overlapping.add((b, g))
            torch.logaddexp(lse_bg[:, r0:r1], lse, out=lse_bg[:, r0:r1])  # -inf on rows not seen yet: lse itself
        else:
            lse_bg[:, r0:r1] = lse
        have.append((r0, r1, out, lse))

    def _share(self, b: int, g: int, r0: int, r1: int, lse: torch.Tensor) -> torch.Tensor | None:
        """A piece's share ``exp(lse_piece − lse_g)`` ``[H,r,1]`` of its group's rows (None: the whole of it)."""
        if (b, g) not in self.overlapping:
            return None
        lse_g = self.lse[b, g, :, r0:r1]
        return torch.exp(lse - lse_g.nan_to_num(neginf=0.0)).unsqueeze(-1)  # exp(-inf) = 0

    def lse_g(self) -> torch.Tensor:
        """``[B,H,Q,G]`` (a view)."""
        return self.lse.permute(0, 2, 3, 1)

    def out_g(self) -> torch.Tensor:
        """The materialised ``[B,H,Q,G,D]`` fp32 (a view of a ``[B,G,H,Q,D]`` buffer)."""
        B, H, Q, G, D = self.shape
        out = torch.zeros(B, G, H, Q, D, dtype=torch.float32, device=self.device)  # [B,G,H,Q,D]
        for (b, g), have in self.pieces.items():
            for r0, r1, piece, lse in have:
                share = self._share(b, g, r0, r1, lse)
                if share is None:
                    out[b, g, :, r0:r1] = piece
                else:
                    out[b, g, :, r0:r1].addcmul_(piece, share)
        for b, r0, r1, block in self.blocks:
            for i, g in enumerate(block.groups):
                out[b, g, :, r0:r1] = block.output(i)
        return out.permute(0, 2, 3, 1, 4)

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        """``Σ_g w[..., g] O_g`` → ``[B,H,Q,D]`` fp32 for weights ``w [B,H,Q,G]``, one pass over the pieces."""
        B, H, Q, G, D = self.shape
        num = torch.empty(B, H, Q, D, dtype=torch.float32, device=self.device)  # [B,H,Q,D]
        for b in range(B):
            covered: list[tuple[int, int]] = []  # rows of num[b] written so far (the first write needs no zeros)
            for bb, r0, r1, block in self.blocks:  # first, each into its own rows (a sample's blocks are disjoint)
                if bb == b:
                    block.weighted(w[b, :, r0:r1], into=num[b, :, r0:r1])
                    covered.append((r0, r1))
            for g in range(G):
                for r0, r1, piece, lse in self.pieces.get((b, g), ()):
                    wg = w[b, :, r0:r1, g, None]  # [H,r,1]
                    share = self._share(b, g, r0, r1, lse)
                    wg = wg if share is None else wg * share
                    for lo, hi, seen in _split(r0, r1, covered):
                        part, w_part, dst = piece[:, lo - r0:hi - r0], wg[:, lo - r0:hi - r0], num[b, :, lo:hi]
                        dst.addcmul_(part, w_part) if seen else torch.mul(part, w_part, out=dst)
                    covered.append((r0, r1))
            for lo, hi, seen in _split(0, Q, covered):
                if not seen:
                    num[b, :, lo:hi] = 0.0
        return num


def _split(r0: int, r1: int, covered: list[tuple[int, int]]):
    """``[r0, r1)`` cut into ``(lo, hi, already covered?)`` pieces against the ``covered`` row intervals."""
    cuts = sorted({r0, r1, *(a for a, _ in covered if r0 < a < r1), *(e for _, e in covered if r0 < e < r1)})
    return [(lo, hi, any(a <= lo and hi <= e for a, e in covered)) for lo, hi in zip(cuts[:-1], cuts[1:])]


def _column_bias(member: torch.Tensor | None, k0: int, k1: int, start: int, dtype, device):
    """``(bias [1,1,1,k1-k0] | None, first allowed column)`` for keys ``[k0, k1)`` of a segment; first = -1 when the
    block holds no key of the segment's group."""
    if member is None:
        return None, 0
    part = member[k0 - start:k1 - start]
    if bool(part.all()):
        return None, 0
    if not bool(part.any()):
        return None, -1
    bias = torch.zeros(k1 - k0, dtype=dtype).masked_fill_(~part, float("-inf")).to(device)
    return bias.view(1, 1, 1, -1), int(part.to(torch.uint8).argmax())


def _explicit_partials(qb, kb, vb, explicit: dict, causal: bool, scale: float, pieces: GroupPieces, b: int,
                       merge_groups: set) -> None:
    """Partials of every tiny group of one sample from their gathered keys, one score pass for all of them, for
    every query that sees one of them. qb ``[H,Q,D]``, kb/vb ``[Hkv,K,D]`` (query head h reads K/V head
    ``h // (H // Hkv)``). Groups in ``merge_groups`` also have segments: their partials are merged into those."""
    H, Q, D = qb.shape
    Hkv, K = kb.shape[0], kb.shape[1]
    R, P0 = H // Hkv, K - Q
    groups = sorted(explicit)
    idx = torch.cat([explicit[g].cpu() for g in groups])  # [S] key positions, sorted on the host (no device sync)
    slot = torch.cat([torch.full((explicit[g].numel(),), i, dtype=torch.long) for i, g in enumerate(groups)])
    idx, order = idx.sort()
    r0 = max(0, int(idx[0]) - P0) if causal else 0
    if r0 >= Q:  # every query comes before the first of these keys
        return
    idx, slot = idx.to(qb.device), slot[order].to(qb.device)  # [S], [S] index into `groups`
    member = slot[None, :] == torch.arange(len(groups), device=qb.device)[:, None]  # [G_e,S]
    k_e, v_e = kb.index_select(1, idx).float(), vb.index_select(1, idx).float()  # [Hkv,S,D]
    C = query_chunk(1, H, Q - r0, idx.numel())
    for c0 in range(r0, Q, C):
        c1 = min(Q, c0 + C)
        q_c = qb[:, c0:c1].float().reshape(Hkv, R * (c1 - c0), D)  # [Hkv, R*C, D]: query heads of one K/V head
        s = torch.matmul(q_c, k_e.transpose(-1, -2)).mul_(scale).view(H, c1 - c0, -1)  # [H,C,S]
        if causal:
            qpos = torch.arange(P0 + c0, P0 + c1, device=qb.device)  # [C]
            s = s.masked_fill_(idx[None, :] > qpos[:, None], float("-inf"))
        top = s.amax(dim=-1, keepdim=True)  # [H,C,1]
        e = s.sub_(top.nan_to_num_(neginf=0.0)).exp_()  # [H,C,S]; 0 on masked keys
        z = torch.matmul(e, member.T.to(e.dtype))  # [H,C,G_e] per-group sums
        lse = torch.log(z) + top  # [H,C,G_e]; -inf for a group the row does not see
        block = ExplicitBlock(e, v_e, slot, groups, z, lse)
        if merge_groups:
            for i, g in enumerate(groups):
                if g in merge_groups:
                    pieces.add(b, g, c0, c1, block.output(i), lse[..., i])
            keep = [i for i, g in enumerate(groups) if g not in merge_groups]
            if not keep:
                continue
            block = _subset(block, keep)
        pieces.add_block(b, c0, c1, block)


def _subset(block: ExplicitBlock, keep: list[int]) -> ExplicitBlock:
    """The block restricted to the groups at positions ``keep``."""
    keys = torch.isin(block.slot, torch.tensor(keep, device=block.slot.device))
    remap = torch.full((len(block.groups),), -1, dtype=torch.long, device=block.slot.device)
    remap[keep] = torch.arange(len(keep), device=block.slot.device)
    return ExplicitBlock(block.e[..., keys], block.v[:, keys], remap[block.slot[keys]], [block.groups[i] for i in keep],
                         block.z[..., keep], block.lse[..., keep])


def sample_partials(qb, kb, vb, runs, pieces: GroupPieces, b: int, *, scale: float, causal: bool,
                    lse_fn=None) -> None:
    """Add sample ``b``'s per-group partials to ``pieces``.

    ``qb [1,H,Q,D]``, ``kb/vb [1,Hkv,K,D]``, ``runs``: this sample's ``(start, end, group)``.
    ``lse_fn`` replaces :func:`attention_lse` (tests)."""
    lse_fn = lse_fn or attention_lse
    Q, K = qb.shape[2], kb.shape[2]
    plan = plan_segments(runs, K)
    for seg in plan.segments:
        for (r0, r1), (k0, k1), is_causal in segment_calls(seg.start, seg.end, Q, K, causal):
            bias, first = _column_bias(seg.member, k0, k1, seg.start, qb.dtype, qb.device)
            if first < 0:
                continue
            o, l = lse_fn(qb[:, :, r0:r1], kb[:, :, k0:k1], vb[:, :, k0:k1], is_causal, scale, bias)
            o, l = o[0], l[0]  # [H,r,D], [H,r]
            if is_causal and first > 0:  # rows before the first key of the group see nothing in this block
                o[:, :first], l[:, :first] = 0.0, float("-inf")
            pieces.add(b, seg.group, r0, r1, o, l)
    if plan.explicit:
        with_segments = {seg.group for seg in plan.segments} & set(plan.explicit)
        _explicit_partials(qb[0], kb[0], vb[0], plan.explicit, causal, scale, pieces, b, with_segments)
