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

import torch

from attnkit.kernels.backends import kernel_name
from attnkit.kernels.masks import KeyMask, check_shapes, query_chunk

__all__ = ["group_partials", "combine_groups", "group_mass", "biased_attention", "masked_attention"]

# Largest number of contiguous (group, padding) runs per sample for which the span path is used.
MAX_SPAN_RUNS = 48
# Up to this many query rows (decode steps) the chunked math path is used: O(Q·K) memory, one pass over the keys.
DECODE_ROWS = 8


def gqa_scores(q_c: torch.Tensor, k_r: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 scores ``[B,Hkv,R,C,Kr]`` for ``q_c [B,H,C,D]`` against ``k_r [B,Hkv,Kr,D]`` (R = H // Hkv), no K/V repeat."""
    B, H, C, D = q_c.shape
    Hkv = k_r.shape[1]
    qf = q_c.float().reshape(B, Hkv, (H // Hkv) * C, D)  # [B,Hkv,R*C,D]
    s = torch.matmul(qf, k_r.float().transpose(-1, -2)) * scale  # [B,Hkv,R*C,Kr]
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


def _row_group_partials(q, k, v, key_group, G, keys: KeyMask, *, scale):
    """Few query rows (decode): one score pass, one row max, per-group sums by one-hot products. O(Q·K) memory."""
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    R = H // Hkv
    kidx, ok, bias = keys.block(slice(0, Q), q.device)  # [Kr], [B|1,H|1,Q,Kr], fp32 | None
    v_r = v.index_select(2, kidx)  # [B,Hkv,Kr,D]
    s = gqa_scores(q, k.index_select(2, kidx), scale)  # [B,Hkv,R,Q,Kr]
    if bias is not None:
        s = s + gqa_view(bias, Hkv)
    s = s.masked_fill(~gqa_view(ok, Hkv), float("-inf"))
    top = s.amax(dim=-1, keepdim=True)  # [B,Hkv,R,Q,1]
    top = torch.where(torch.isinf(top), 0.0, top)
    e = torch.exp(s - top)  # [B,Hkv,R,Q,Kr], 0 on masked keys
    onehot = torch.nn.functional.one_hot(key_group.index_select(1, kidx), G).float()  # [B,Kr,G]
    eg = e.unsqueeze(-2) * onehot.transpose(1, 2)[:, None, None, None]  # [B,Hkv,R,Q,G,Kr]: e split by group
    z = eg.sum(-1)  # [B,Hkv,R,Q,G]
    num = torch.matmul(eg.reshape(B, Hkv, R * Q * G, -1), v_r.float()).view(B, Hkv, R, Q, G, D)  # [B,Hkv,R,Q,G,D]
    out_g = torch.where(z.unsqueeze(-1) > 0, num / z.clamp_min(1e-30).unsqueeze(-1), 0.0)
    lse_g = torch.where(z > 0, torch.log(z.clamp_min(1e-30)) + top, float("-inf"))  # [B,Hkv,R,Q,G]
    return out_g.reshape(B, H, Q, G, D), lse_g.reshape(B, H, Q, G)


# --------------------------------------------------------------------------------------------------------
# span path: fused SDPA calls per contiguous run of one group, merged by log-sum-exp
# --------------------------------------------------------------------------------------------------------
def _math_attention_lse(q, k, v, causal: bool, scale: float):
    """(out, lse) of attention of ``q [B,H,Q,D]`` on ``k,v [B,H,K,D]`` with top-left causal alignment.

    Query-chunked math (memory O(chunk·K)); the device-independent stand-in for the CPU fused kernel.
    """
    B, H, Q, D = q.shape
    K = k.shape[2]
    out = torch.empty(B, H, Q, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, Q, dtype=torch.float32, device=q.device)
    C = query_chunk(B, H, Q, K)
    kf, vf = k.float(), v.float()
    for c0 in range(0, Q, C):
        c1 = min(Q, c0 + C)
        s = torch.matmul(q[:, :, c0:c1].float(), kf.transpose(-1, -2)) * scale  # [B,H,C,K]
        if causal:
            s = s.masked_fill(torch.arange(K, device=q.device)[None] > torch.arange(c0, c1, device=q.device)[:, None],
                              float("-inf"))
        l = torch.logsumexp(s, dim=-1)  # [B,H,C]
        out[:, :, c0:c1] = torch.matmul(torch.exp(s - l.unsqueeze(-1)), vf)
        lse[:, :, c0:c1] = l
    return out, lse


def attention_lse(q, k, v, causal: bool, scale: float):
    """(out fp32 [B,H,Q,D], lse fp32 [B,H,Q]) of plain attention, top-left causal; fused kernel on CPU."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=None, scale=scale)
        return out.float(), lse.float()
    return _math_attention_lse(q, k, v, causal, scale)


def merge_partial(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: fold a partial ``(out [...,D], lse [...])`` into the accumulator (exact log-sum-exp merge)."""
    new = torch.logaddexp(lse_acc, lse)  # [...]
    safe = torch.where(torch.isinf(new), 0.0, new)
    w_old = torch.exp(lse_acc - safe).unsqueeze(-1)  # exp(-inf) = 0
    w_new = torch.exp(lse - safe).unsqueeze(-1)
    out_acc.copy_(out_acc * w_old + out * w_new)
    lse_acc.copy_(new)


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


def _run_partial(qb, kb, vb, s: int, e: int, causal: bool, scale: float, out_acc, lse_acc) -> None:
    """Merge the partial of keys ``[s, e)`` into ``out_acc [H,Q,D]`` / ``lse_acc [H,Q]`` of one sample.

    ``qb [1,H,Q,D]``, ``kb/vb [1,H,K,D]``; queries sit at positions ``K-Q .. K-1``.
    """
    Q, K = qb.shape[2], kb.shape[2]
    P0 = K - Q
    if not causal:
        o, l = attention_lse(qb, kb[:, :, s:e], vb[:, :, s:e], False, scale)
        merge_partial(out_acc, lse_acc, o[0], l[0])
        return
    d0 = max(s, P0)
    if d0 < e:  # queries whose position lies inside the run: causal square part (+ run keys before the queries)
        qi = slice(d0 - P0, e - P0)
        o, l = attention_lse(qb[:, :, qi], kb[:, :, d0:e], vb[:, :, d0:e], True, scale)
        merge_partial(out_acc[:, qi], lse_acc[:, qi], o[0], l[0])
        if s < d0:
            o, l = attention_lse(qb[:, :, qi], kb[:, :, s:d0], vb[:, :, s:d0], False, scale)
            merge_partial(out_acc[:, qi], lse_acc[:, qi], o[0], l[0])
    a0 = max(e, P0)
    if a0 < K:  # queries after the run see all of it
        qi = slice(a0 - P0, Q)
        o, l = attention_lse(qb[:, :, qi], kb[:, :, s:e], vb[:, :, s:e], False, scale)
        merge_partial(out_acc[:, qi], lse_acc[:, qi], o[0], l[0])


def _span_group_partials(q, k, v, runs, G, *, scale, causal):
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    out_g = torch.zeros(B, H, Q, G, D, dtype=torch.float32, device=q.device)  # [B,H,Q,G,D]
    lse_g = torch.full((B, H, Q, G), float("-inf"), dtype=torch.float32, device=q.device)  # [B,H,Q,G]
    ke = k.unsqueeze(2).expand(B, Hkv, H // Hkv, K, D).reshape(B, H, K, D) if Hkv != H else k  # copy only for GQA
    ve = v.unsqueeze(2).expand(B, Hkv, H // Hkv, K, D).reshape(B, H, K, D) if Hkv != H else v
    for b in range(B):
        for s, e, g in runs[b]:
            # out_g[b, :, :, g] is a strided view; merge into contiguous buffers and write back once per run.
            o_acc, l_acc = out_g[b, :, :, g].clone(), lse_g[b, :, :, g].clone()  # [H,Q,D], [H,Q]
            _run_partial(q[b:b + 1], ke[b:b + 1], ve[b:b + 1], s, e, causal, scale, o_acc, l_acc)
            out_g[b, :, :, g], lse_g[b, :, :, g] = o_acc, l_acc
    return out_g, lse_g


def _span_eligible(runs) -> bool:
    return max((len(r) for r in runs), default=0) <= MAX_SPAN_RUNS


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------
def group_partials(q, k, v, key_group, num_groups: int, *, scale: float | None = None, mask=None, causal: bool = True,
                   key_padding=None, window: int | None = None, num_sinks: int = 0, backend: str = "torch"):
    """Per-row, per-group attention partials ``(out_g [B,H,Q,G,D], lse_g [B,H,Q,G])``, both fp32.

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
    if Q <= DECODE_ROWS:  # decode / tiny chunks: one pass over the keys beats a call per span
        return _row_group_partials(q, k, v, key_group, num_groups, keys, scale=scale)
    if keys.structured and keys.window is None:
        runs = group_runs(key_group, keys.key_padding)
        if _span_eligible(runs):
            return _span_group_partials(q, k, v, runs, num_groups, scale=scale, causal=keys.causal)
    return _chunked_group_partials(q, k, v, key_group, num_groups, keys, scale=scale, chunk=None, restrict_keys=True)


def group_mass(lse_g: torch.Tensor) -> torch.Tensor:
    """Share of each row's attention mass per group, ``M [B,H,Q,G]`` (rows with no allowed key: all 0).

    Example:
        >>> import torch, math
        >>> group_mass(torch.log(torch.tensor([[[[1.0, 3.0]]]])))
        tensor([[[[0.2500, 0.7500]]]])
    """
    top = lse_g.amax(dim=-1, keepdim=True)  # [B,H,Q,1]
    top = torch.where(torch.isinf(top), 0.0, top)
    w = torch.exp(lse_g - top)  # [B,H,Q,G]
    den = w.sum(-1, keepdim=True)
    return torch.where(den > 0, w / torch.where(den > 0, den, 1.0), 0.0)


def combine_groups(out_g: torch.Tensor, lse_g: torch.Tensor, factors: torch.Tensor | None = None, *,
                   log_factors: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Renormalised reweighted attention ``Σ_g M_g c_g O_g / Σ_g M_g c_g`` → ``[B,H,Q,D]``.

    ``factors`` ``c_g`` is ``[B,H,Q,G]`` or broadcastable (None = 1, which gives plain attention).
    A pre-softmax additive bias ``b_g`` on the keys of group ``g`` is exactly ``factors = exp(b_g)``: pass it
    as ``log_factors = b_g`` to stay in log space (no overflow for large biases). Rows whose weighted mass is
    0 (no allowed key, or every present group given factor 0) give 0. Output dtype: ``dtype`` (default fp32;
    the public wrappers pass q's dtype).

    Example (ACT with beta = 0.4 on the sink group 1):
        >>> import torch
        >>> out_g = torch.eye(2).view(1, 1, 1, 2, 2)                      # O_0 = e0, O_1 = e1
        >>> lse_g = torch.log(torch.tensor([0.7, 0.3])).view(1, 1, 1, 2)  # masses 0.7 / 0.3
        >>> combine_groups(out_g, lse_g, torch.tensor([1.0, 0.4]))        # 0.12 / 0.82 to the sink
        tensor([[[[0.8537, 0.1463]]]])
    """
    logw = lse_g.float()  # [B,H,Q,G]
    if log_factors is not None:
        logw = logw + log_factors.float()
    if factors is not None:
        logw = logw + torch.log(factors.float())  # log 0 = -inf drops the group
    top = logw.amax(dim=-1, keepdim=True)  # [B,H,Q,1]
    top = torch.where(torch.isinf(top), 0.0, top)
    w = torch.exp(logw - top)  # [B,H,Q,G]
    den = w.sum(-1)  # [B,H,Q]
    num = torch.einsum("bhqg,bhqgd->bhqd", w, out_g.float())  # [B,H,Q,D]
    out = torch.where((den > 0).unsqueeze(-1), num / torch.where(den > 0, den, 1.0).unsqueeze(-1), 0.0)
    return out if dtype is None else out.to(dtype)


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
    if Hkv != H:
        k_r = k_r.unsqueeze(2).expand(B, Hkv, H // Hkv, Kr, D).reshape(B, H, Kr, D)
        v_r = v_r.unsqueeze(2).expand(B, Hkv, H // Hkv, Kr, D).reshape(B, H, Kr, D)
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
    G = 1 if group_bias is None else group_bias.shape[-1]
    logf = None if group_bias is None else group_bias.float().unsqueeze(2)  # [B|1,H,1,G]
    if backend == "eager":
        out_g, lse_g = group_partials(q, k, v, key_group, G, scale=scale, mask=keys, backend="eager")
        return combine_groups(out_g, lse_g, log_factors=logf, dtype=q.dtype)
    if keys.structured and keys.window is None:
        runs = group_runs(key_group, keys.key_padding)
        if _span_eligible(runs):
            out_g, lse_g = _span_group_partials(q, k, v, runs, G, scale=scale, causal=keys.causal)
            return combine_groups(out_g, lse_g, log_factors=logf, dtype=q.dtype)
    per_key = None if group_bias is None else _bias_per_key(group_bias, key_group, H)[:, :, None, :]  # [B,H,1,K]
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
    return _chunked_masked(q, k, v, keys, bias, scale=scale)
