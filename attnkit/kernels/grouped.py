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

Masking conventions shared by every backend (and by :mod:`attnkit.kernels.stats`):

* queries are the LAST ``Q`` of the ``K`` key positions: query ``i`` sits at ``K-Q+i`` and, when ``causal``,
  sees keys ``j <= K-Q+i`` (bottom-right alignment, as in KV-cache decoding and chunked prefill);
* ``key_padding [B,K]`` bool, True = real token; padded keys are excluded;
* ``window``/``num_sinks``: key ``j`` is allowed iff ``pos_i - j < window`` or ``j`` is one of the first
  ``num_sinks`` *real* keys of its sample (with left padding the sinks are the first real tokens, not pad slots);
* a row (or a group within a row) with no allowed key gets output 0 and lse ``-inf`` — never NaN.

Backends: ``"eager"`` materialises the whole ``[B,H,Q,K]`` score matrix (the reference); ``"torch"`` never
does: when every sample's groups form a few contiguous runs (image block, prompt, a handful of scattered
sinks) and there is no window, each run is covered by fused SDPA calls that return the log-sum-exp (one causal
call on the run's square part plus one non-causal call for later queries), merged exactly; otherwise it
falls back to query-chunked math with memory O(chunk·K). ``"triton"`` runs the fused kernels in
:mod:`attnkit.kernels.triton`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["group_partials", "combine_groups", "group_mass", "biased_attention", "BACKENDS"]

BACKENDS = ("eager", "torch", "triton")

# Largest number of contiguous (group, padding) runs per sample for which the span path is used.
MAX_SPAN_RUNS = 48
# Up to this many query rows (decode steps) the chunked math path is used: O(Q·K) memory, one pass over the keys.
DECODE_ROWS = 8
# Score-matrix budget (elements) for one query chunk of the chunked fallback: 2**22 fp32 = 16 MiB.
CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------------
# masks shared by all torch paths
# --------------------------------------------------------------------------------------------------------
def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> tuple[int, ...]:
    """Validate ``q [B,H,Q,D]``, ``k/v [B,Hkv,K,D]`` and return ``(B, H, Hkv, Q, K, D)``."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q [B,H,Q,D] and k [B,Hkv,K,D], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, Q, D = q.shape
    Bk, Hkv, K, Dk = k.shape
    if Bk != B or Dk != D or H % Hkv != 0:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)} (need same B, D and H % Hkv == 0)")
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} does not match k {tuple(k.shape)}")
    if Q > K:
        raise ValueError(f"more queries ({Q}) than keys ({K}): queries must be the last Q of the K positions")
    return B, H, Hkv, Q, K, D


def sink_flags(key_padding: torch.Tensor | None, num_sinks: int, K: int, device) -> torch.Tensor | None:
    """``[B|1, K]`` bool: True for the first ``num_sinks`` real keys of each sample (None when no sinks)."""
    if not num_sinks:
        return None
    if key_padding is None:
        return (torch.arange(K, device=device) < num_sinks)[None]  # [1,K]
    real = key_padding.to(torch.bool)
    return real & (real.cumsum(-1) <= num_sinks)  # [B,K]


def allowed_mask(
    qpos: torch.Tensor,
    kidx: torch.Tensor,
    *,
    causal: bool,
    key_padding: torch.Tensor | None,
    sinks: torch.Tensor | None,
    window: int | None,
) -> torch.Tensor:
    """``[B|1, 1, C, Kr]`` bool: may query at absolute position ``qpos[c]`` attend key ``kidx[r]``.

    ``key_padding`` and ``sinks`` are the full ``[B|1, K]`` tensors; they are indexed with ``kidx`` here.
    """
    C, Kr = qpos.numel(), kidx.numel()
    ok = torch.ones(1, 1, C, Kr, dtype=torch.bool, device=qpos.device)  # [1,1,C,Kr]
    diff = qpos[:, None] - kidx[None, :]  # [C,Kr]
    if causal:
        ok = ok & (diff >= 0)
    if window is not None:
        near = diff < window  # [C,Kr]
        if sinks is not None:
            near = near[None] | sinks[:, kidx][:, None, :]  # [B|1,C,Kr]
        ok = ok & near.view(-1, 1, C, Kr)
    if key_padding is not None:
        ok = ok & key_padding[:, kidx].to(torch.bool)[:, None, None, :]
    return ok


def key_index(p0: int, p1: int, K: int, *, causal: bool, window: int | None, sinks: torch.Tensor | None,
              device) -> torch.Tensor:
    """Indices of the keys that queries at positions ``[p0, p1)`` can possibly see (sinks + band), sorted."""
    hi = p1 if causal else K
    lo = 0
    if window is not None:
        lo = max(0, p0 - window + 1)
    if lo == 0:
        return torch.arange(0, hi, device=device)
    sink_hi = 0
    if sinks is not None and bool(sinks.any()):
        sink_hi = int(sinks.any(0).nonzero().max()) + 1
    lo = max(lo, sink_hi)
    return torch.cat([torch.arange(0, min(sink_hi, hi), device=device), torch.arange(lo, hi, device=device)])


def query_chunk(B: int, H: int, Q: int, K: int) -> int:
    """Query-chunk length so that one ``[B,H,C,K]`` fp32 score block stays within ``CHUNK_ELEMENTS``."""
    return int(max(16, min(Q, CHUNK_ELEMENTS // max(1, B * H * K))))


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


def safe_softmax(s: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax over the last dim; rows with no allowed entry give p = 0 and lse = -inf."""
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [..., C]
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))  # exp(-inf) = 0 on empty rows
    return p, lse


# --------------------------------------------------------------------------------------------------------
# chunked (and, with one chunk, eager) path
# --------------------------------------------------------------------------------------------------------
def _chunked_group_partials(q, k, v, key_group, G, *, scale, causal, key_padding, window, num_sinks,
                            chunk: int | None, restrict_keys: bool):
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    R = H // Hkv
    out_g = torch.zeros(B, H, Q, G, D, dtype=torch.float32, device=q.device)  # [B,H,Q,G,D]
    lse_g = torch.full((B, H, Q, G), float("-inf"), dtype=torch.float32, device=q.device)  # [B,H,Q,G]
    sinks = sink_flags(key_padding, num_sinks, K, q.device)
    C = chunk or query_chunk(B, H, Q, K)
    for c0 in range(0, Q, C):
        c1 = min(Q, c0 + C)
        p0, p1 = K - Q + c0, K - Q + c1
        if restrict_keys:
            kidx = key_index(p0, p1, K, causal=causal, window=window, sinks=sinks, device=q.device)
        else:
            kidx = torch.arange(K, device=q.device)
        qpos = torch.arange(p0, p1, device=q.device)
        ok = allowed_mask(qpos, kidx, causal=causal, key_padding=key_padding, sinks=sinks, window=window)
        ok = ok.unsqueeze(1)  # [B|1,1,1,C,Kr]
        k_r, v_r = k[:, :, kidx], v[:, :, kidx]  # [B,Hkv,Kr,D]
        s = gqa_scores(q[:, :, c0:c1], k_r, scale)  # [B,Hkv,R,C,Kr]
        grp = key_group[:, kidx]  # [B,Kr]
        for g in range(G):
            in_g = (grp == g)[:, None, None, None, :]  # [B,1,1,1,Kr]
            p, lse = safe_softmax(s, ok & in_g)  # [B,Hkv,R,C,Kr], [B,Hkv,R,C]
            out_g[:, :, c0:c1, g] = gqa_pv(p, v_r)
            lse_g[:, :, c0:c1, g] = lse.reshape(B, H, c1 - c0)
    return out_g, lse_g


def _row_group_partials(q, k, v, key_group, G, *, scale, causal, key_padding, window, num_sinks):
    """Few query rows (decode): one score pass, one row max, per-group sums by one-hot products. O(Q·K) memory."""
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    R = H // Hkv
    sinks = sink_flags(key_padding, num_sinks, K, q.device)
    kidx = key_index(K - Q, K, K, causal=causal, window=window, sinks=sinks, device=q.device)
    qpos = torch.arange(K - Q, K, device=q.device)
    ok = allowed_mask(qpos, kidx, causal=causal, key_padding=key_padding, sinks=sinks, window=window)  # [B|1,1,Q,Kr]
    k_r, v_r = k[:, :, kidx], v[:, :, kidx]  # [B,Hkv,Kr,D]
    s = gqa_scores(q, k_r, scale).masked_fill(~ok.unsqueeze(1), float("-inf"))  # [B,Hkv,R,Q,Kr]
    top = s.amax(dim=-1, keepdim=True)  # [B,Hkv,R,Q,1]
    top = torch.where(torch.isinf(top), 0.0, top)
    e = torch.exp(s - top)  # [B,Hkv,R,Q,Kr], 0 on masked keys
    onehot = torch.nn.functional.one_hot(key_group[:, kidx], G).float()  # [B,Kr,G]
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


def _span_eligible(runs, window) -> bool:
    return window is None and max((len(r) for r in runs), default=0) <= MAX_SPAN_RUNS


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------
def group_partials(q, k, v, key_group, num_groups: int, *, scale: float | None = None, causal: bool = True,
                   key_padding=None, window: int | None = None, num_sinks: int = 0, backend: str = "torch"):
    """Per-row, per-group attention partials ``(out_g [B,H,Q,G,D], lse_g [B,H,Q,G])``, both fp32.

    ``lse_g = log Σ_{j∈g, allowed} exp(s_ij)`` and ``out_g`` is the softmax-within-group average of ``v`` over
    group ``g``; an empty group gives ``lse = -inf`` and ``out = 0``. ``key_group [B,K]`` int64 in ``[0, G)``.

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
    """
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    scale = D ** -0.5 if scale is None else float(scale)
    if key_group.shape != (B, K):
        raise ValueError(f"key_group must be [B,K] = {(B, K)}, got {tuple(key_group.shape)}")
    if not 1 <= num_groups <= 64:
        raise ValueError(f"num_groups must be in [1, 64], got {num_groups}")
    kw = dict(scale=scale, causal=causal, key_padding=key_padding, window=window, num_sinks=num_sinks)
    if backend == "eager":
        return _chunked_group_partials(q, k, v, key_group, num_groups, chunk=Q, restrict_keys=False, **kw)
    if backend == "torch":
        if Q <= DECODE_ROWS:  # decode / tiny chunks: one pass over the keys beats a call per span
            return _row_group_partials(q, k, v, key_group, num_groups, **kw)
        runs = group_runs(key_group, key_padding)
        if _span_eligible(runs, window):
            return _span_group_partials(q, k, v, runs, num_groups, scale=scale, causal=causal)
        return _chunked_group_partials(q, k, v, key_group, num_groups, chunk=None, restrict_keys=True, **kw)
    if backend == "triton":
        from attnkit.kernels import triton as tk

        return tk.group_partials(q, k, v, key_group, num_groups, **kw)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


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


def _chunked_biased(q, k, v, key_group, group_bias, *, scale, causal, key_padding, window, num_sinks):
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    R = H // Hkv
    out = torch.empty(B, H, Q, D, dtype=q.dtype, device=q.device)  # [B,H,Q,D]
    sinks = sink_flags(key_padding, num_sinks, K, q.device)
    bias = None if group_bias is None else _bias_per_key(group_bias, key_group, H).view(B, Hkv, R, 1, K)
    C = min(256, query_chunk(B, H, Q, K))
    for c0 in range(0, Q, C):
        c1 = min(Q, c0 + C)
        p0, p1 = K - Q + c0, K - Q + c1
        kidx = key_index(p0, p1, K, causal=causal, window=window, sinks=sinks, device=q.device)
        ok = allowed_mask(torch.arange(p0, p1, device=q.device), kidx, causal=causal, key_padding=key_padding,
                          sinks=sinks, window=window).unsqueeze(1)  # [B|1,1,1,C,Kr]
        if q.device.type == "cpu":  # fused CPU kernel with an additive [B|1,H|1,C,Kr] mask for this chunk
            out[:, :, c0:c1] = _fused_masked_chunk(q[:, :, c0:c1], k[:, :, kidx], v[:, :, kidx], ok,
                                                   None if bias is None else bias[..., kidx], scale)
            continue
        s = gqa_scores(q[:, :, c0:c1], k[:, :, kidx], scale)  # [B,Hkv,R,C,Kr]
        if bias is not None:
            s = s + bias[..., kidx]
        p, _ = safe_softmax(s, ok)
        out[:, :, c0:c1] = gqa_pv(p, v[:, :, kidx]).to(q.dtype)
    return out


def _fused_masked_chunk(q_c, k_r, v_r, ok, bias, scale):
    """One query chunk through the fused CPU kernel: ``ok [B|1,1,1,C,Kr]``, ``bias [B,Hkv,R,1,Kr]`` or None.

    Rows with no allowed key come back as 0 (the kernel's lse is -inf there).
    """
    B, H, C, D = q_c.shape
    Hkv, Kr = k_r.shape[1], k_r.shape[2]
    mask = torch.zeros(ok.shape, dtype=torch.float32, device=q_c.device).masked_fill_(~ok, float("-inf"))
    mask = mask.view(ok.shape[0], 1, C, Kr)  # [B|1,1,C,Kr]
    if bias is not None:
        mask = mask + bias.reshape(B, H, 1, Kr)  # [B,H,C,Kr]
    if Hkv != H:
        k_r = k_r.unsqueeze(2).expand(B, Hkv, H // Hkv, Kr, D).reshape(B, H, Kr, D)
        v_r = v_r.unsqueeze(2).expand(B, Hkv, H // Hkv, Kr, D).reshape(B, H, Kr, D)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_c, k_r, v_r, 0.0, False, attn_mask=mask.to(q_c.dtype), scale=scale)
    return torch.where(torch.isinf(lse).unsqueeze(-1), 0.0, o.float()).to(q_c.dtype)


def biased_attention(q, k, v, key_group=None, group_bias=None, *, scale: float | None = None, causal: bool = True,
                     key_padding=None, window: int | None = None, num_sinks: int = 0,
                     backend: str = "torch") -> torch.Tensor:
    """Attention with an additive pre-softmax bias ``group_bias[b, h, key_group[b, j]]`` → ``[B,H,Q,D]`` (q dtype).

    ``group_bias`` is ``[B|1, H, G]`` or None (plain attention with the causal/padding/sink+window masks).
    One accumulator: this is the fast path for pre-softmax edits such as PASTA-style group emphasis.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
        >>> out = biased_attention(q, k, v, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 2, 1))
        >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
        True
    """
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    scale = D ** -0.5 if scale is None else float(scale)
    if group_bias is not None and key_group is None:
        raise ValueError("group_bias needs key_group")
    if key_group is None or group_bias is None:
        key_group = torch.zeros(B, K, dtype=torch.long, device=q.device)
        group_bias = None
    kw = dict(scale=scale, causal=causal, key_padding=key_padding, window=window, num_sinks=num_sinks)
    if backend == "triton":
        from attnkit.kernels import triton as tk

        return tk.biased_attention(q, k, v, key_group, group_bias, **kw)
    if backend == "eager":
        G = 1 if group_bias is None else group_bias.shape[-1]
        out_g, lse_g = group_partials(q, k, v, key_group, G, backend="eager", **kw)
        logf = None if group_bias is None else group_bias.float().unsqueeze(2)  # [B|1,H,1,G]
        return combine_groups(out_g, lse_g, log_factors=logf, dtype=q.dtype)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    runs = group_runs(key_group, key_padding)
    if _span_eligible(runs, window):
        G = 1 if group_bias is None else group_bias.shape[-1]
        out_g, lse_g = _span_group_partials(q, k, v, runs, G, scale=scale, causal=causal)
        logf = None if group_bias is None else group_bias.float().unsqueeze(2)  # [B|1,H,1,G]
        return combine_groups(out_g, lse_g, log_factors=logf, dtype=q.dtype)
    return _chunked_biased(q, k, v, key_group, group_bias, **kw)
