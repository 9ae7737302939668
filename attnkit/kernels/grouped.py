"""Group-wise partial attention: the exact building block for post-softmax group edits (VAR, ACT, PASTA …).

For one query row split the keys into token groups ``g`` (e.g. 0 = other, 1 = sink, 2 = image). With
``Z_g = Σ_{j∈g} e^{s_j}`` and ``O_g = Σ_{j∈g} e^{s_j} v_j / Z_g``, plain attention is ``Σ_g M_g O_g`` where
``M_g = Z_g / Σ_h Z_h`` is the group's share of the row's attention mass. Any edit of the form
``p'_j = p_j · c_g`` followed by renormalisation is ``Σ_g M_g c_g O_g / Σ_g M_g c_g``, so it needs only
``(O_g, log Z_g)`` per row and group — never the ``[Q, K]`` probability matrix.

Public functions (shapes: q ``[B,H,Q,D]``; k, v ``[B,Hkv,K,D]`` with ``H % Hkv == 0``):

* :func:`group_partials` → ``(out_g [B,H,Q,G,D], lse_g [B,H,Q,G])`` in fp32.
* :func:`combine_groups` → ``out [B,H,Q,D]``; :func:`group_mass` → ``M [B,H,Q,G]``.
* :func:`biased_attention` → attention with an additive pre-softmax per-(head, group) bias.

Masks (:class:`attnkit.kernels.masks.KeyMask`, shared with :mod:`attnkit.kernels.stats` and the Triton kernels):
pass the model's own ``mask`` (None, bool ``[B|1,H|1,Q,K]`` True = attend, or additive float) and every path is
exact for it — bidirectional image blocks, prefix or chunked masks, sliding windows, padding. ``causal`` and
``window`` are then hints: a mask that provably equals "bottom-right causal & key padding (& window)" takes the
fast structured paths, any other mask is sliced per query chunk. Without a ``mask`` the structured arguments
describe it directly: queries are the LAST ``Q`` of the ``K`` key positions (query ``i`` at ``K-Q+i`` sees keys
``j <= K-Q+i`` when ``causal``), ``key_padding [B,K]`` True = real token, ``window``/``num_sinks``: key ``j`` is
allowed iff ``pos_i - j < window`` or ``j`` is one of the first ``num_sinks`` real keys of its sample. A row (or a
group within a row) with no allowed key gets output 0 and lse ``-inf`` — never NaN.

Implementations (``backend=``, names from :mod:`attnkit.kernels.backends`): ``"eager"`` materialises the whole
``[B,H,Q,K]`` score matrix (the reference); ``"torch"`` never does: for a structured mask without a window whose
groups form a few contiguous runs per sample (image block, prompt, a handful of scattered sinks) each run is
covered by fused SDPA calls that return the log-sum-exp (one causal call on the run's square part plus one
non-causal call for later queries), merged exactly; otherwise query-chunked math with memory O(chunk·K).
``"triton"`` runs the fused kernels in :mod:`attnkit.kernels.triton`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attnkit.kernels import segments
from attnkit.kernels.backends import kernel_name
from attnkit.kernels.masks import KeyMask, causal_allowed, check_shapes, query_chunk
from attnkit.kernels.segments import _math_attention_lse, attention_lse, merge_partial  # noqa: F401 (re-exported)

__all__ = ["group_partials", "combine_groups", "group_mass", "biased_attention", "masked_attention",
           "fused_key_bias"]

# Largest number of contiguous (group, padding) runs per sample for which the span path is used.
MAX_SPAN_RUNS = 48
# Up to this many query rows (decode steps) the chunked math path is used: O(Q·K) memory, one pass over the keys.
DECODE_ROWS = 8
# Smallest normal fp32: a weight sum clamped to it divides a row of zeros into zeros.
_TINY = torch.finfo(torch.float32).tiny


def gqa_scores(q_c: torch.Tensor, k_r: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 scores ``[B,Hkv,R,C,Kr]`` for ``q_c [B,H,C,D]`` against ``k_r [B,Hkv,Kr,D]`` (R = H // Hkv), no K/V repeat."""
    B, H, C, D = q_c.shape
    Hkv = k_r.shape[1]
    qf = q_c.float().reshape(B, Hkv, (H // Hkv) * C, D)  # [B,Hkv,R*C,D]
    s = torch.matmul(qf, k_r.float().transpose(-1, -2)).mul_(scale)  # [B,Hkv,R*C,Kr]
    return s.view(B, Hkv, H // Hkv, C, -1)  # [B,Hkv,R,C,Kr]


def gqa_pv(p: torch.Tensor, v_r: torch.Tensor) -> torch.Tensor:
    """``p [B,Hkv,R,C,Kr]`` @ ``v_r [B,Hkv,Kr,D]`` → ``[B,H,C,D]`` fp32."""
    B, Hkv, R, C, Kr = p.shape
    o = torch.matmul(p.reshape(B, Hkv, R * C, Kr), v_r.float())  # [B,Hkv,R*C,D]
    return o.view(B, Hkv * R, C, -1)  # [B,H,C,D]


def gqa_view(t: torch.Tensor | None, Hkv: int) -> torch.Tensor | None:
    """A per-head (or head-broadcast) block ``[B|1, H|1, C, Kr]`` as ``[B|1, Hkv|1, R|1, C, Kr]`` for GQA scores."""
    if t is None:
        return None
    if t.shape[1] == 1:
        return t.unsqueeze(1)
    return t.reshape(t.shape[0], Hkv, t.shape[1] // Hkv, *t.shape[2:])


def safe_softmax(s: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax over the last dim; rows with no allowed entry give p = 0 and lse = -inf."""
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [..., C]
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))  # exp(-inf) = 0 on empty rows
    return p, lse


# --------------------------------------------------------------------------------------------------------
# chunked (and, with one chunk, eager) path
# --------------------------------------------------------------------------------------------------------
def _chunked_group_partials(q, k, v, key_group, G, keys: KeyMask, *, scale, chunk: int | None, restrict_keys: bool):
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    out_g = torch.zeros(B, H, Q, G, D, dtype=torch.float32, device=q.device)  # [B,H,Q,G,D]
    lse_g = torch.full((B, H, Q, G), float("-inf"), dtype=torch.float32, device=q.device)  # [B,H,Q,G]
    C = chunk or query_chunk(B, H, Q, K)
    for c0 in range(0, Q, C):
        rows = slice(c0, min(Q, c0 + C))
        kidx, ok, bias = keys.block(rows, q.device, restrict_keys)  # [Kr], [B|1,H|1,C,Kr], fp32 | None
        v_r = v.index_select(2, kidx)  # [B,Hkv,Kr,D]
        s = gqa_scores(q[:, :, rows], k.index_select(2, kidx), scale)  # [B,Hkv,R,C,Kr]
        if bias is not None:
            s = s + gqa_view(bias, Hkv)
        ok = gqa_view(ok, Hkv)  # [B|1,Hkv|1,R|1,C,Kr]
        grp = key_group.index_select(1, kidx)  # [B,Kr]
        for g in range(G):
            in_g = (grp == g)[:, None, None, None, :]  # [B,1,1,1,Kr]
            p, lse = safe_softmax(s, ok & in_g)  # [B,Hkv,R,C,Kr], [B,Hkv,R,C]
            out_g[:, :, rows, g] = gqa_pv(p, v_r)
            lse_g[:, :, rows, g] = lse.reshape(B, H, -1)
    return out_g, lse_g


def _row_mask(keys: KeyMask, Q: int, K: int, device) -> torch.Tensor | None:
    """Allowed pairs ``[B|1,1,1,Q,K]`` of a structured mask without window (None when every key is allowed)."""
    ok = None
    if keys.causal and Q > 1:
        ok = causal_allowed(Q, K, device)[None, None, None]  # [1,1,1,Q,K]
    if keys.key_padding is not None:
        pad = keys.key_padding.to(device=device, dtype=torch.bool)[:, None, None, None, :]  # [B,1,1,1,K]
        ok = pad if ok is None else ok & pad
    return ok


class RowSums(NamedTuple):
    """The attention of a few query rows split by key group (:func:`row_sums`)."""

    p: torch.Tensor  # [B,Hkv,R*Q,Kr] fp32: the rows' probabilities (0 on masked keys and on rows that see no key)
    member: torch.Tensor  # [B,G,Kr] fp32: 1 where key j is in group g
    v: torch.Tensor  # [B,Hkv,Kr,D] the values of the scored keys
    mass: torch.Tensor  # [B,H,Q,G] fp32: M_g = Σ_{j∈g} p_j
    lse: torch.Tensor | None  # [B,H,Q,1] fp32 log-sum-exp of the row's scores (when asked for), -inf: no key

    def partials(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out_g [B,H,Q,G,D], lse_g [B,H,Q,G])`` as :func:`group_partials` returns them (needs ``lse``)."""
        B, Hkv, RQ, Kr = self.p.shape
        _, H, Q, G = self.mass.shape
        pg = self.p.unsqueeze(-2) * self.member[:, None, None]  # [B,Hkv,R*Q,G,Kr]
        num = torch.matmul(pg.reshape(B, Hkv, RQ * G, Kr), self.v.float()).view(B, H, Q, G, -1)
        out_g = num / torch.where(self.mass > 0, self.mass, 1.0).unsqueeze(-1)  # [B,H,Q,G,D]; empty groups: 0
        return out_g, torch.log(self.mass) + self.lse  # log 0 = -inf


def group_member(key_group: torch.Tensor, G: int) -> torch.Tensor:
    """One-hot group membership ``[B,G,K]`` fp32 of ``key_group [B,K]`` (ids outside ``[0, G)`` are in no group).

    Example:
        >>> group_member(torch.tensor([[0, 2, 1, 0]]), 3)[0].tolist()
        [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    """
    return (key_group[:, None, :] == torch.arange(G, device=key_group.device)[:, None]).float()


def row_sums(q, k, v, key_group, G, keys: KeyMask, *, scale, lse: bool = False,
             member: torch.Tensor | None = None) -> RowSums:
    """Few query rows (decode): one score pass, O(Q·K) memory, the rows' probabilities and their mass per group
    (see :class:`RowSums`). Under a causal + padding mask (the decode case) every key is scored in place, with no
    copy of K or V. ``member``: :func:`group_member` of ``key_group`` when the caller has it already.

    Every product is batched over ``B`` only (query heads × rows flattened): no K, V or membership is repeated per
    head, and a decode step costs a handful of operations beyond the two passes over K and V."""
    B, H, Q, _ = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    if keys.structured and keys.window is None and not (keys.causal and Q > K):
        s = gqa_scores(q, k, scale)  # [B,Hkv,R,Q,K]
        v_r = v
        member = group_member(key_group, G) if member is None else member  # [B,G,K]
        ok = _row_mask(keys, Q, K, q.device)  # [B|1,1,1,Q,K] | None (None: every row sees every key)
    else:
        kidx, ok, bias = keys.block(slice(0, Q), q.device)  # [Kr], [B|1,H|1,Q,Kr], fp32 | None
        v_r = v.index_select(2, kidx)  # [B,Hkv,Kr,D]
        member = group_member(key_group.index_select(1, kidx), G) if member is None else member.index_select(2, kidx)
        s = gqa_scores(q, k.index_select(2, kidx), scale)  # [B,Hkv,R,Q,Kr]
        if bias is not None:
            s = s.add_(gqa_view(bias, Hkv))
        ok = gqa_view(ok, Hkv)
    if ok is not None:
        s = s.masked_fill_(~ok, float("-inf"))
    Kr = s.shape[-1]
    s = s.view(B, Hkv, -1, Kr)  # [B,Hkv,R*Q,Kr]
    row_lse = torch.logsumexp(s, dim=-1, keepdim=True).view(B, H, Q, 1) if lse else None
    p = torch.softmax(s, dim=-1)  # [B,Hkv,R*Q,Kr]
    if ok is not None:  # a row that sees no key: NaN → 0
        p = p.nan_to_num_(0.0)
    mass = torch.bmm(p.view(B, H * Q, Kr), member.transpose(1, 2))  # [B,H*Q,G]
    return RowSums(p, member, v_r, mass.view(B, H, Q, G), row_lse)


def _row_group_partials(q, k, v, key_group, G, keys: KeyMask, *, scale):
    """:func:`row_sums` as ``(out_g [B,H,Q,G,D], lse_g [B,H,Q,G])``."""
    return row_sums(q, k, v, key_group, G, keys, scale=scale, lse=True).partials()


def row_reweight(sums: RowSums, factors: torch.Tensor, dtype=None) -> torch.Tensor:
    """Reweighted attention from :func:`row_sums`: ``Σ_j c_{g(j)} p_j v_j / Σ_j c_{g(j)} p_j`` → ``[B,H,Q,D]``, the
    same value as :func:`combine_groups` on the group partials, with the factors spread over the keys: no per-group
    outputs. Rows whose weighted mass is 0 give 0. ``sums.p`` is scaled in place (read it before, not after).

    Example (two keys with equal scores, in groups 0 and 1; the second group × 0.4):
        >>> from attnkit.kernels.masks import KeyMask
        >>> q, k, v = torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 2, 2), torch.eye(2).view(1, 1, 2, 2)
        >>> sums = row_sums(q, k, v, torch.tensor([[0, 1]]), 2, KeyMask.build(1, 2), scale=1.0)
        >>> row_reweight(sums, torch.tensor([1.0, 0.4]))             # masses 0.5 / 0.5 → 0.5 / 0.2, renormalised
        tensor([[[[0.7143, 0.2857]]]])
    """
    B, Hkv, RQ, Kr = sums.p.shape
    _, H, Q, G = sums.mass.shape
    c = factors.float().expand(B, H, Q, G).reshape(B, H * Q, G)  # [B,H*Q,G]
    weighted = sums.p.view(B, H * Q, Kr).mul_(torch.bmm(c, sums.member))  # [B,H*Q,Kr]: c_{g(j)} p_j
    den = weighted.sum(-1, keepdim=True).clamp_min_(_TINY)  # [B,H*Q,1]; 0 → out 0
    out = torch.matmul(weighted.view(B, Hkv, RQ, Kr), sums.v.float())  # [B,Hkv,R*Q,D]
    out = out.view(B, H * Q, -1).div_(den).view(B, H, Q, -1)
    return out if dtype is None else out.to(dtype)


# --------------------------------------------------------------------------------------------------------
# span path: a few fused SDPA calls per group (see attnkit.kernels.segments), merged by log-sum-exp
# --------------------------------------------------------------------------------------------------------
def group_runs(key_group: torch.Tensor, key_padding: torch.Tensor | None) -> list[list[tuple[int, int, int]]]:
    """Per sample, the maximal runs ``(start, end, group)`` of equal group among real keys (padding dropped)."""
    labels = key_group.to(torch.int64)  # [B,K]
    if key_padding is not None:
        labels = torch.where(key_padding.to(torch.bool), labels, torch.full_like(labels, -1))
    runs = []
    for row in labels.cpu():
        cuts = ((row[1:] != row[:-1]).nonzero().flatten() + 1).tolist()
        bounds = [0] + cuts + [row.numel()]
        starts = row[bounds[:-1]].tolist()
        runs.append([(s, e, g) for s, e, g in zip(bounds[:-1], bounds[1:], starts) if g >= 0])
    return runs


def _span_group_partials(q, k, v, runs, G, *, scale, causal, materialise: bool = True):
    """Span decomposition (:mod:`attnkit.kernels.segments`) → ``(out_g [B,H,Q,G,D], lse_g [B,H,Q,G])`` fp32
    (views of ``[B,G,H,Q,·]`` buffers); with ``materialise=False`` ``out_g`` is the
    :class:`~attnkit.kernels.segments.GroupPieces` itself, which only :func:`combine_groups` reads."""
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    pieces = segments.GroupPieces(B, G, H, Q, D, q.device)
    for b in range(B):  # K/V stay [B,Hkv,K,D]: the fused kernel reads GQA heads in place
        segments.sample_partials(q[b:b + 1], k[b:b + 1], v[b:b + 1], runs[b], pieces, b, scale=scale,
                                 causal=causal, lse_fn=attention_lse)
    return (pieces.out_g() if materialise else pieces), pieces.lse_g()


def _span_eligible(runs) -> bool:
    return max((len(r) for r in runs), default=0) <= MAX_SPAN_RUNS


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------
def group_partials(q, k, v, key_group, num_groups: int, *, scale: float | None = None, mask=None, causal: bool = True,
                   key_padding=None, window: int | None = None, num_sinks: int = 0, backend: str = "torch",
                   materialise: bool = True):
    """Per-row, per-group attention partials ``(out_g [B,H,Q,G,D], lse_g [B,H,Q,G])``, both fp32.

    ``materialise=False`` (for a caller that only combines the groups): the CPU span path may return, in place of
    ``out_g``, the fused calls' pieces (:class:`~attnkit.kernels.segments.GroupPieces`), which
    :func:`combine_groups` reads without a ``[B,H,Q,G,D]`` buffer.

    ``lse_g = log Σ_{j∈g, allowed} exp(s_ij)`` and ``out_g`` is the softmax-within-group average of ``v`` over
    group ``g``; an empty group gives ``lse = -inf`` and ``out = 0``. ``key_group [B,K]`` int64 in ``[0, G)``.
    ``mask``: the model's attention mask (or a :class:`~attnkit.kernels.masks.KeyMask`); see the module docstring.

    Example:
        >>> import torch
        >>> from attnkit.kernels.grouped import group_partials, combine_groups
        >>> q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
        >>> groups = torch.tensor([[1, 0, 0, 2, 2]])
        >>> out_g, lse_g = group_partials(q, k, v, groups, 3, scale=8 ** -0.5)
        >>> out_g.shape, lse_g.shape
        (torch.Size([1, 2, 5, 3, 8]), torch.Size([1, 2, 5, 3]))
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> torch.allclose(combine_groups(out_g, lse_g), ref, atol=1e-5)
        True
        >>> block = torch.ones(5, 5).tril().bool(); block[1:3, 1:3] = True    # keys 1-2 see each other
        >>> out_g, lse_g = group_partials(q, k, v, groups, 3, scale=8 ** -0.5, mask=block)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=block)
        >>> torch.allclose(combine_groups(out_g, lse_g), ref, atol=1e-5)
        True
    """
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    scale = D ** -0.5 if scale is None else float(scale)
    backend = kernel_name(backend)
    if key_group.shape != (B, K):
        raise ValueError(f"key_group must be [B,K] = {(B, K)}, got {tuple(key_group.shape)}")
    if not 1 <= num_groups <= 64:
        raise ValueError(f"num_groups must be in [1, 64], got {num_groups}")
    keys = KeyMask.build(Q, K, mask=mask, causal=causal, key_padding=key_padding, window=window, num_sinks=num_sinks)
    if backend == "eager":
        return _chunked_group_partials(q, k, v, key_group, num_groups, keys, scale=scale, chunk=Q,
                                       restrict_keys=False)
    if backend == "triton":
        from attnkit.kernels import triton as tk

        return tk.group_partials(q, k, v, key_group, num_groups, scale=scale, mask=keys)
    if backend == "flex":
        raise ValueError("group_partials: the flex backend's partials are attnkit.kernels.flex.flex_group_partials")
    if Q <= DECODE_ROWS:  # decode / tiny chunks: one pass over the keys beats a call per span
        return _row_group_partials(q, k, v, key_group, num_groups, keys, scale=scale)
    if keys.structured and keys.window is None:
        runs = group_runs(key_group, keys.key_padding)
        if _span_eligible(runs):
            return _span_group_partials(q, k, v, runs, num_groups, scale=scale, causal=keys.causal,
                                        materialise=materialise)
    return _chunked_group_partials(q, k, v, key_group, num_groups, keys, scale=scale, chunk=None, restrict_keys=True)


def group_mass(lse_g: torch.Tensor) -> torch.Tensor:
    """Share of each row's attention mass per group, ``M [B,H,Q,G]`` (rows with no allowed key: all 0).

    Example:
        >>> import torch, math
        >>> group_mass(torch.log(torch.tensor([[[[1.0, 3.0]]]])))
        tensor([[[[0.2500, 0.7500]]]])
    """
    top = lse_g.amax(dim=-1, keepdim=True).nan_to_num_(neginf=0.0)  # [B,H,Q,1]; 0 on a row with no key
    w = torch.exp(lse_g - top)  # [B,H,Q,G]
    return w.div_(w.sum(-1, keepdim=True).clamp_min_(_TINY))  # the largest term is 1, so a sum below 1 is 0


def combine_groups(out_g: torch.Tensor, lse_g: torch.Tensor, factors: torch.Tensor | None = None, *,
                   log_factors: torch.Tensor | None = None, mass: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Renormalised reweighted attention ``Σ_g M_g c_g O_g / Σ_g M_g c_g`` → ``[B,H,Q,D]``.

    ``factors`` ``c_g`` is ``[B,H,Q,G]`` or broadcastable (None = 1, which gives plain attention).
    A pre-softmax additive bias ``b_g`` on the keys of group ``g`` is exactly ``factors = exp(b_g)``: pass it
    as ``log_factors = b_g`` to stay in log space (no overflow for large biases). ``mass``: :func:`group_mass` of
    ``lse_g`` when the caller has it already (it computed the factors from it): the weights are then ``M_g c_g``
    normalised, a few operations fewer (with ``log_factors`` it is not used). Rows whose weighted mass is 0 (no
    allowed key, or every present group given factor 0) give 0. Output dtype: ``dtype`` (default fp32; the public
    wrappers pass q's dtype).

    Example (ACT with beta = 0.4 on the sink group 1):
        >>> import torch
        >>> out_g = torch.eye(2).view(1, 1, 1, 2, 2)                      # O_0 = e0, O_1 = e1
        >>> lse_g = torch.log(torch.tensor([0.7, 0.3])).view(1, 1, 1, 2)  # masses 0.7 / 0.3
        >>> combine_groups(out_g, lse_g, torch.tensor([1.0, 0.4]))        # 0.12 / 0.82 to the sink
        tensor([[[[0.8537, 0.1463]]]])
        >>> combine_groups(out_g, lse_g, torch.tensor([1.0, 0.4]), mass=group_mass(lse_g))
        tensor([[[[0.8537, 0.1463]]]])
    """
    if mass is not None and log_factors is None:
        w = mass.float() if factors is None else mass.float() * factors.float()  # [B,H,Q,G]
    else:
        logw = lse_g.float()  # [B,H,Q,G]
        if log_factors is not None:
            logw = logw + log_factors.float()
        if factors is not None:
            logw = logw + torch.log(factors.float())  # log 0 = -inf drops the group
        top = logw.amax(dim=-1, keepdim=True).nan_to_num_(neginf=0.0)  # [B,H,Q,1]
        w = torch.exp(logw - top)  # [B,H,Q,G]
    w = w.div_(w.sum(-1, keepdim=True).clamp_min_(_TINY))  # normalised on [B,H,Q,G]: no pass over [B,H,Q,D] for it
    out = _weighted_sum(w, out_g)  # [B,H,Q,D]; 0 where every weight is 0
    return out if dtype is None else out.to(dtype)


def _weighted_sum(w: torch.Tensor, out_g: torch.Tensor) -> torch.Tensor:
    """``Σ_g w[..., g] out_g[..., g, :]`` → ``[B,H,Q,D]`` fp32 for ``w [B,H,Q,G]``, ``out_g [B,H,Q,G,D]``: one
    multiply-add pass per group (no ``[B,H,Q,G,D]`` temporary; works on the span path's group-major layout)."""
    if isinstance(out_g, segments.GroupPieces):
        return out_g.weighted_sum(w)
    G = w.shape[-1]
    if G > 8:
        return torch.matmul(w.unsqueeze(-2), out_g.float()).squeeze(-2)
    num = out_g[..., 0, :].float() * w[..., 0:1]
    for g in range(1, G):
        num = num.addcmul_(out_g[..., g, :].float(), w[..., g:g + 1])
    return num


def _bias_per_key(group_bias: torch.Tensor, key_group: torch.Tensor, H: int) -> torch.Tensor:
    """``group_bias [B|1,H,G]`` gathered at each key's group → ``[B,H,K]`` fp32."""
    B, K = key_group.shape
    gb = group_bias.float().expand(B, H, group_bias.shape[-1])  # [B,H,G]
    return torch.gather(gb, 2, key_group[:, None, :].expand(B, H, K).to(torch.int64))  # [B,H,K]


def _score_bias_block(bias: torch.Tensor | None, rows: slice, kidx: torch.Tensor) -> torch.Tensor | None:
    """The part of a bias broadcastable to ``[B,H,Q,K]`` that a block of rows × ``kidx`` keys sees (no expansion)."""
    if bias is None:
        return None
    bias = bias if bias.dim() == 4 else bias.view(*([1] * (4 - bias.dim())), *bias.shape)
    if bias.shape[2] > 1:
        bias = bias[:, :, rows]
    if bias.shape[3] > 1:
        bias = bias.index_select(3, kidx.to(bias.device))
    return bias.float()


def _chunked_masked(q, k, v, keys: KeyMask, bias: torch.Tensor | None, *, scale) -> torch.Tensor:
    """Query-chunked attention with ``keys`` and an additive ``bias`` broadcastable to ``[B,H,Q,K]`` → ``[B,H,Q,D]``
    in q's dtype; memory O(chunk·K) beyond the inputs."""
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    out = torch.empty(B, H, Q, D, dtype=q.dtype, device=q.device)  # [B,H,Q,D]
    C = min(256, query_chunk(B, H, Q, K))
    for c0 in range(0, Q, C):
        rows = slice(c0, min(Q, c0 + C))
        kidx, ok, mask_bias = keys.block(rows, q.device)  # [Kr], [B|1,H|1,C,Kr], fp32 | None
        extra = _score_bias_block(bias, rows, kidx)  # [B|1,H|1,C|1,Kr] | None
        if mask_bias is not None:
            extra = mask_bias if extra is None else mask_bias + extra
        k_r, v_r = k.index_select(2, kidx), v.index_select(2, kidx)  # [B,Hkv,Kr,D]
        if q.device.type == "cpu":  # fused CPU kernel with an additive [B|1,H|1,C,Kr] mask for this chunk
            out[:, :, rows] = _fused_masked_chunk(q[:, :, rows], k_r, v_r, ok, extra, scale)
            continue
        s = gqa_scores(q[:, :, rows], k_r, scale)  # [B,Hkv,R,C,Kr]
        if extra is not None:
            s = s + gqa_view(extra, Hkv)
        p, _ = safe_softmax(s, gqa_view(ok, Hkv))
        out[:, :, rows] = gqa_pv(p, v_r).to(q.dtype)
    return out


def _fused_masked_chunk(q_c, k_r, v_r, ok, bias, scale):
    """One query chunk through the fused CPU kernel: ``ok [B|1,H|1,C,Kr]`` bool, ``bias`` broadcastable or None.

    Rows with no allowed key (or whose every allowed score is biased to -inf) come back as 0.
    """
    B, H, C, D = q_c.shape
    Hkv, Kr = k_r.shape[1], k_r.shape[2]
    add = torch.zeros(ok.shape, dtype=torch.float32, device=q_c.device).masked_fill_(~ok, float("-inf"))
    if bias is not None:
        add = add + bias  # [B|1,H|1,C,Kr]
    if Hkv != H and not segments.native_gqa():
        k_r, v_r = segments.expand_kv(k_r, H), segments.expand_kv(v_r, H)
    o, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_c, k_r, v_r, 0.0, False, attn_mask=add.to(q_c.dtype), scale=scale)
    empty = torch.isneginf(add).all(-1, keepdim=True)  # [B|1,H|1,C,1]: the kernel's lse is not reliable there
    return torch.where(empty, 0.0, o.float()).to(q_c.dtype)


def biased_attention(q, k, v, key_group=None, group_bias=None, *, scale: float | None = None, mask=None,
                     causal: bool = True, key_padding=None, window: int | None = None, num_sinks: int = 0,
                     backend: str = "torch") -> torch.Tensor:
    """Attention with an additive pre-softmax bias ``group_bias[b, h, key_group[b, j]]`` → ``[B,H,Q,D]`` (q dtype).

    ``group_bias`` is ``[B|1, H, G]`` or None (plain attention under the mask). One accumulator: this is the fast
    path for pre-softmax edits such as PASTA-style group emphasis. ``mask`` as in :func:`group_partials`.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
        >>> out = biased_attention(q, k, v, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 2, 1))
        >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
        True
    """
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    scale = D ** -0.5 if scale is None else float(scale)
    backend = kernel_name(backend)
    if group_bias is not None and key_group is None:
        raise ValueError("group_bias needs key_group")
    if key_group is None or group_bias is None:
        key_group = torch.zeros(B, K, dtype=torch.long, device=q.device)
        group_bias = None
    keys = KeyMask.build(Q, K, mask=mask, causal=causal, key_padding=key_padding, window=window, num_sinks=num_sinks)
    if backend == "triton":
        from attnkit.kernels import triton as tk

        return tk.biased_attention(q, k, v, key_group, group_bias, scale=scale, mask=keys)
    if backend == "flex":
        raise ValueError("biased_attention: for the flex backend call attnkit.kernels.flex.flex_biased_attention")
    G = 1 if group_bias is None else group_bias.shape[-1]
    logf = None if group_bias is None else group_bias.float().unsqueeze(2)  # [B|1,H,1,G]
    if backend == "eager":
        out_g, lse_g = group_partials(q, k, v, key_group, G, scale=scale, mask=keys, backend="eager")
        return combine_groups(out_g, lse_g, log_factors=logf, dtype=q.dtype)
    per_key = None if group_bias is None else _bias_per_key(group_bias, key_group, H)[:, :, None, :]  # [B,H,1,K]
    out = fused_key_bias(q, k, v, keys, per_key, scale=scale)  # one fused call (CPU, causal + padding)
    if out is not None:
        return out
    if keys.structured and keys.window is None and q.device.type == "cpu":
        runs = group_runs(key_group, keys.key_padding)
        if _span_eligible(runs):
            out_g, lse_g = _span_group_partials(q, k, v, runs, G, scale=scale, causal=keys.causal)
            return combine_groups(out_g, lse_g, log_factors=logf, dtype=q.dtype)
    return _chunked_masked(q, k, v, keys, per_key, scale=scale)


def masked_attention(q, k, v, mask=None, bias: torch.Tensor | None = None, *, scale: float | None = None,
                     causal: bool = True, window: int | None = None) -> torch.Tensor:
    """Attention under the model's ``mask`` plus an additive pre-softmax ``bias`` broadcastable to ``[B,H,Q,K]``
    (e.g. ``[B,1,1,K]`` key biases) → ``[B,H,Q,D]`` in q's dtype, query-chunked: no ``[Q, K]`` tensor beyond the
    mask and the bias themselves. Rows with no allowed key give 0.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
        >>> bias = torch.tensor([0.0, -1.0, 2.0, 0.5]).view(1, 1, 1, 4)
        >>> causal = torch.ones(4, 4).tril().bool()
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~causal, -1e9))
        >>> torch.allclose(masked_attention(q, k, v, None, bias), ref, atol=1e-5)
        True
    """
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    scale = D ** -0.5 if scale is None else float(scale)
    keys = KeyMask.build(Q, K, mask=mask, causal=causal, window=window)
    out = fused_key_bias(q, k, v, keys, bias, scale=scale)
    return _chunked_masked(q, k, v, keys, bias, scale=scale) if out is None else out


# --------------------------------------------------------------------------------------------------------
# per-key biases under a causal + padding mask: one fused call
# --------------------------------------------------------------------------------------------------------
def _per_key(bias: torch.Tensor | None, B: int, H: int, Q: int, K: int):
    """A bias broadcastable to ``[B,H,Q,K]`` as ``[B|1, H|1, 1, K]`` fp32 when it does not vary per query
    (None in, None out); ``False`` when it does (no fused call can take it without a ``[Q, K]`` mask)."""
    if bias is None:
        return None
    if bias.dim() > 4:
        return False
    bias = bias.view(*([1] * (4 - bias.dim())), *bias.shape)
    if bias.shape[2] != 1 or bias.shape[0] not in (1, B) or bias.shape[1] not in (1, H) or bias.shape[3] not in (1, K):
        return False
    return bias.float()


def _empty_rows(add: torch.Tensor, Q: int, causal: bool, offset: int) -> torch.Tensor | None:
    """Rows with no allowed key ``[B|1,H|1,Q,1]`` bool for an additive column mask ``add [B|1,H|1,1,Kb]`` (None when
    every row has one). Query ``i`` sees columns ``≤ offset + i`` when ``causal``, all of them otherwise."""
    finite = torch.isfinite(add)  # [B|1,H|1,1,Kb]
    if bool(finite.all()):
        return None
    any_ok = finite.any(-1, keepdim=True)  # [B|1,H|1,1,1]
    first = torch.where(any_ok, finite.to(torch.uint8).argmax(-1, keepdim=True), add.shape[-1])  # [..,1,1]
    if not causal:
        return (first >= add.shape[-1]).expand(*first.shape[:2], Q, 1)
    rows = torch.arange(offset, offset + Q, device=add.device).view(1, 1, Q, 1)
    return rows < first  # [B|1,H|1,Q,1]


def _lse_call(q, k, v, causal: bool, scale: float, add: torch.Tensor | None, offset: int = 0):
    """:func:`attention_lse` with fully masked rows fixed to out 0, lse -inf (the fused kernel returns lse 0)."""
    out, lse = attention_lse(q, k, v, causal, scale, add)  # [B,H,Q,D], [B,H,Q]
    if add is not None:
        empty = _empty_rows(add, q.shape[2], causal, offset)
        if empty is not None:
            out = out.masked_fill_(empty, 0.0)
            lse = lse.masked_fill_(empty[..., 0], float("-inf"))
    return out, lse


def fused_key_bias(q, k, v, keys: KeyMask, bias: torch.Tensor | None, *, scale: float) -> torch.Tensor | None:
    """Attention under a causal (or no) + key-padding mask plus an additive per-key ``bias`` (broadcastable to
    ``[B,H,Q,K]`` with one query row, e.g. ``[B,1,1,K]``) with the fused CPU kernel: one call (two when the
    queries are a suffix of the keys, 1 < Q < K), the bias and the padding as one ``[B|1,H|1,1,K]`` column mask.
    → ``[B,H,Q,D]`` in q's dtype, rows with no allowed key 0; None when it does not apply (not CPU, a window or an
    explicit model mask, a bias that varies per query).

    Example:
        >>> import torch
        >>> from attnkit.kernels.masks import KeyMask
        >>> q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
        >>> bias = torch.tensor([0.0, -1.0, 2.0, 0.5, 0.0]).view(1, 1, 1, 5)
        >>> out = fused_key_bias(q, k, v, KeyMask.build(5, 5), bias, scale=8 ** -0.5)
        >>> torch.allclose(out, masked_attention(q, k, v, torch.ones(5, 5).tril().bool(), bias), atol=1e-5)
        True
    """
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    per_key = _per_key(bias, B, H, Q, K)
    if q.device.type != "cpu" or not keys.structured or keys.window is not None or per_key is False:
        return None
    if keys.causal and Q > K:
        return None  # the structured mask refuses this; let the general path say so
    add = per_key if per_key is None or per_key.shape[-1] == K else per_key.expand(*per_key.shape[:3], K)
    if keys.key_padding is not None:
        pad = torch.zeros(keys.key_padding.shape, dtype=torch.float32, device=q.device)  # [B,K]
        pad = pad.masked_fill_(~keys.key_padding.to(device=q.device, dtype=torch.bool), float("-inf"))[:, None, None]
        add = pad if add is None else add + pad  # [B|1,H|1,1,K]
    causal = keys.causal and Q > 1
    if not causal or Q == K:
        out, _ = _lse_call(q, k, v, causal, scale, add)  # GQA K/V read in place
        return out.to(q.dtype)
    P0 = K - Q  # 1 < Q < K: bottom-right causal = the keys before the queries (all visible) + a causal square
    part = (lambda a, b: None) if add is None else (lambda a, b: add[..., a:b])
    out, lse = _lse_call(q, k[:, :, :P0], v[:, :, :P0], False, scale, part(0, P0))
    o2, l2 = _lse_call(q, k[:, :, P0:], v[:, :, P0:], True, scale, part(P0, K))
    merge_partial(out, lse, o2, l2)
    return out.to(q.dtype)
