"""Triton kernels: flash-style forward with per-group partials or a group bias, and the key-mass pass.

Design (why not G accumulators in one program): a program keeps one ``[BLOCK_M, D]`` fp32 accumulator. For the
per-group partials the grid gets a third axis, the group, and each program walks only the key blocks that
(a) contain a real key of its group and (b) are not fully masked by causality or the sink+window band. These
block lists (``[B, G, n_q_blocks, n_k_blocks]`` int32, FlexAttention's BlockMask idea) are built once in torch.
Groups are mostly contiguous spans, so every key block is visited by about one group: total work ≈ one flash
pass, while G register accumulators would cost G ``P·V`` products per block and G×[BLOCK_M, D] registers
(impossible for G = 8, D = 128). Boundary blocks shared by two groups are visited twice.

Masks: the structured form of :class:`attnkit.kernels.masks.KeyMask` (causal, key padding, window + sinks) is
computed in the kernel from indices; an explicit model mask (bidirectional blocks, prefix or chunked masks …) is
loaded tile by tile (``MASK_KIND`` 1 = bool, 2 = additive float whose values are added to the scores), and its
all-masked tiles are dropped from the block lists, so any mask is exact and costs only the tiles it allows.

Dtypes: q/k/v fp16, bf16 or fp32; softmax statistics and accumulators in fp32. fp32 inputs use IEEE dot
products (no TF32) so they match torch to ~1e-6. Under the interpreter bf16 is upcast to fp32 right after each
load (the interpreter's bf16 arithmetic is wrong). Decode (Q = 1) uses one 16-row query block.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attnkit.kernels.masks import KeyMask, check_shapes

MAX_GROUPS = 8
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _fwd_kernel(
    Qp, Kp, Vp, GRP, SINK, IDX, CNT, BIAS, MASKp, Op, LSEp,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sog, sod,
    slb, slh, slm, slg,
    sbb, sbh, sbg,
    sib, sig, sim, scb, scg,
    smb, smh, smq, smk,
    H, Q, K, D, n_rep, scale, window, mask_floor,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, PER_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    g = tl.program_id(2)
    b = bh // H
    h = bh % H
    hk = h // n_rep
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index [M]
    qpos = offs_m + (K - Q)  # absolute position [M]
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Qp + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m < Q)[:, None] & dmask[None, :], other=0.0)  # [M, D]
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_blocks = tl.load(CNT + b * scb + g * scg + pid_m)
    for t in range(0, n_blocks):
        kb = tl.load(IDX + b * sib + g * sig + pid_m * sim + t)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)  # key index [N]
        kmask = offs_n < K
        kt = tl.load(Kp + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=kmask[None, :] & dmask[:, None], other=0.0)  # [D, N]
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PREC) * scale  # [M, N] fp32
        grp = tl.load(GRP + b * K + offs_n, mask=kmask, other=-1)  # [N]
        ok = (grp >= 0)[None, :] & (offs_m < Q)[:, None]
        if PER_GROUP:
            ok = ok & (grp == g)[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            near = (qpos[:, None] - offs_n[None, :]) < window
            if HAS_SINKS:
                snk = tl.load(SINK + b * K + offs_n, mask=kmask, other=0)
                near = near | (snk != 0)[None, :]
            ok = ok & near
        if HAS_BIAS:
            bias = tl.load(BIAS + b * sbb + h * sbh + tl.maximum(grp, 0) * sbg, mask=kmask, other=0.0)
            s = s + bias.to(tl.float32)[None, :]
        if MASK_KIND != 0:  # the model's explicit mask tile [M, N]
            mv = tl.load(MASKp + b * smb + h * smh + offs_m[:, None] * smq + offs_n[None, :] * smk,
                         mask=(offs_m < Q)[:, None] & kmask[None, :], other=0)
            if MASK_KIND == 1:
                ok = ok & (mv != 0)
            else:
                mvf = mv.to(tl.float32)
                allowed = mvf > mask_floor
                ok = ok & allowed
                s = s + tl.where(allowed, mvf, 0.0)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)  # 0 while the row was empty
        p = tl.exp(s - m_safe[:, None])  # [M, N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(Vp + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=kmask[:, None] & dmask[None, :], other=0.0)  # [N, D]
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]  # empty rows: acc = 0 -> 0
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    rmask = offs_m < Q
    tl.store(Op + b * sob + h * soh + g * sog + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(Op.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(LSEp + b * slb + h * slh + g * slg + offs_m * slm, lse, mask=rmask)


@triton.jit
def _key_mass_kernel(
    Qp, Kp, GRP, SINK, SEL, LSEp, QLO, QHI, MASKp, OUT,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    slb, slh, slm,
    sob, soh, son,
    smb, smh, smq, smk,
    H, Q, K, D, n_rep, scale, window, n_kb, mask_floor,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_SEL: tl.constexpr,
    MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // n_rep
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key index [N]
    kmask = offs_n < K
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kt = tl.load(Kp + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                 mask=kmask[None, :] & dmask[:, None], other=0.0)  # [D, N]
    if UPCAST:
        kt = kt.to(tl.float32)
    grp = tl.load(GRP + b * K + offs_n, mask=kmask, other=-1)
    real = grp >= 0
    if HAS_SINKS:
        snk = tl.load(SINK + b * K + offs_n, mask=kmask, other=0) != 0
    col = tl.zeros([BLOCK_N], tl.float32)
    lo = tl.load(QLO + b * n_kb + pid_n)
    hi = tl.load(QHI + b * n_kb + pid_n)
    for i in range(lo, hi):
        offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = offs_m < Q
        qpos = offs_m + (K - Q)
        q = tl.load(Qp + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PREC) * scale  # [M, N]
        lse = tl.load(LSEp + b * slb + h * slh + offs_m * slm, mask=rmask, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows contribute 0
        ok = real[None, :] & rmask[:, None]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            near = (qpos[:, None] - offs_n[None, :]) < window
            if HAS_SINKS:
                near = near | snk[None, :]
            ok = ok & near
        if MASK_KIND != 0:
            mv = tl.load(MASKp + b * smb + h * smh + offs_m[:, None] * smq + offs_n[None, :] * smk,
                         mask=rmask[:, None] & kmask[None, :], other=0)
            if MASK_KIND == 1:
                ok = ok & (mv != 0)
            else:
                mvf = mv.to(tl.float32)
                allowed = mvf > mask_floor
                ok = ok & allowed
                s = s + tl.where(allowed, mvf, 0.0)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        if HAS_SEL:
            sel = tl.load(SEL + b * Q + offs_m, mask=rmask, other=0.0)
            p = p * sel[:, None]
        col += tl.sum(p, 0)
    tl.store(OUT + b * sob + h * soh + offs_n * son, col, mask=kmask)


# ------------------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dtype_flags(q: torch.Tensor) -> tuple[bool, str]:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton attention supports fp16, bf16 and fp32, got {q.dtype}")
    upcast = q.dtype == torch.float32 or (_INTERPRET and q.dtype == torch.bfloat16)
    return upcast, ("ieee" if q.dtype == torch.float32 else "tf32")


def _blocks(D: int, block_m: int, block_n: int) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(D))
    for name, size in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot shapes), got {size}")
    return block_m, block_n, block_d


def _key_labels(key_group, key_padding, B: int, K: int, device) -> torch.Tensor:
    """``[B,K]`` int32: the key's group, or -1 for padded keys."""
    grp = key_group.to(device=device, dtype=torch.int32).expand(B, K)
    if key_padding is not None:
        grp = torch.where(key_padding.to(device=device, dtype=torch.bool), grp, torch.full_like(grp, -1))
    return grp.contiguous()


def _mask_arg(keys: KeyMask, dev):
    """``(tensor, strides (b, h, q, k), kind, floor)`` of an explicit mask for the kernels (kind 0: none)."""
    m = keys.explicit
    if m is None:
        return torch.zeros(1, dtype=torch.uint8, device=dev), (0, 0, 0, 0), 0, 0.0
    m = m.to(dev)
    if not m.is_floating_point() and m.dtype != torch.bool:
        m = m != 0  # an integer 0/1 mask (rare): one bool copy
    strides = tuple(0 if m.shape[i] == 1 else m.stride(i) for i in range(4))
    if m.dtype == torch.bool:
        return m.view(torch.uint8), strides, 1, 0.0
    return m, strides, 2, float(torch.finfo(m.dtype).min / 2)


def mask_blocks(keys: KeyMask, block_m: int, block_n: int, dev) -> torch.Tensor | None:
    """``[B|1, nqb, nkb]`` bool: tiles of an explicit mask that allow at least one pair (None for structured masks).
    One query block at a time: memory O(block_m·K)."""
    if keys.structured:
        return None
    Q, K = keys.q_len, keys.k_len
    nqb, nkb = _cdiv(Q, block_m), _cdiv(K, block_n)
    rows = []
    for qb in range(nqb):
        _, ok, _ = keys.block(slice(qb * block_m, min(Q, (qb + 1) * block_m)), dev, restrict=False)  # [B|1,H|1,C,K]
        cols = ok.any(dim=2).any(dim=1)  # [B|1, K]
        cols = torch.nn.functional.pad(cols, (0, nkb * block_n - K))
        rows.append(cols.view(cols.shape[0], nkb, block_n).any(-1))  # [B|1, nkb]
    return torch.stack(rows, 1)  # [B|1, nqb, nkb]


def block_lists(grp, sinks, Q: int, K: int, n_lists: int, per_group: bool, *, causal: bool, window,
                block_m: int, block_n: int, tiles: torch.Tensor | None = None):
    """Active key blocks per (sample, group, query block): ``(idx [B,G,nqb,nkb] int32, cnt [B,G,nqb] int32)``.

    A block is active when it holds a real key of the group and is not fully masked by causality, the band or the
    explicit mask's ``tiles [B|1,nqb,nkb]``. ``idx[..., :cnt]`` lists them in ascending order.
    """
    B = grp.shape[0]
    nqb, nkb = _cdiv(Q, block_m), _cdiv(K, block_n)
    dev = grp.device
    pad = torch.full((B, nkb * block_n - K), -1, dtype=grp.dtype, device=dev)
    gb = torch.cat([grp, pad], 1).view(B, nkb, block_n)  # [B,nkb,BN]
    if per_group:
        present = gb[:, None] == torch.arange(n_lists, device=dev, dtype=grp.dtype)[None, :, None, None]
        present = present.any(-1)  # [B,G,nkb]
    else:
        present = (gb >= 0).any(-1)[:, None]  # [B,1,nkb]
    qb = torch.arange(nqb, device=dev)
    q_lo = K - Q + qb * block_m  # first position in the query block [nqb]
    q_hi = torch.clamp(K - Q + (qb + 1) * block_m, max=K) - 1  # last position
    kb = torch.arange(nkb, device=dev)
    k_lo, k_hi = kb * block_n, torch.clamp((kb + 1) * block_n, max=K) - 1
    feas = torch.ones(1, nqb, nkb, dtype=torch.bool, device=dev)  # [1,nqb,nkb]
    if causal:
        feas = feas & (k_lo[None, :] <= q_hi[:, None])[None]
    if window is not None:
        band = (q_lo[:, None] - k_hi[None, :] < window)[None]  # [1,nqb,nkb]
        if sinks is not None:
            spad = torch.zeros(sinks.shape[0], nkb * block_n - K, dtype=torch.bool, device=dev)
            has_sink = torch.cat([sinks, spad], 1).view(-1, nkb, block_n).any(-1)  # [B|1,nkb]
            band = band | has_sink[:, None, :]
        feas = feas & band
    if tiles is not None:
        feas = feas & tiles  # [B|1,nqb,nkb]
    active = present[:, :, None, :] & feas[:, None]  # [B,G,nqb,nkb]
    cnt = active.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~active).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return idx.contiguous(), cnt.contiguous()


def _launch_options(num_warps: int | None, num_stages: int | None) -> dict:
    """Triton's launch options, only those given (None: Triton's own default)."""
    return {name: value for name, value in (("num_warps", num_warps), ("num_stages", num_stages)) if value is not None}


def _forward(q, k, v, key_group, *, num_groups: int, per_group: bool, group_bias, scale, keys: KeyMask,
             block_m: int, block_n: int, num_warps: int | None = None, num_stages: int | None = None):
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    BM, BN, BD = _blocks(D, block_m, block_n)
    upcast, prec = _dtype_flags(q)
    dev = q.device
    grp = _key_labels(key_group, keys.key_padding, B, K, dev)  # [B,K]
    sinks = keys.sinks(dev)
    n_lists = num_groups if per_group else 1
    idx, cnt = block_lists(grp, sinks, Q, K, n_lists, per_group, causal=keys.structured and keys.causal,
                           window=keys.window, block_m=BM, block_n=BN, tiles=mask_blocks(keys, BM, BN, dev))
    sink_t = (sinks.expand(B, K).to(torch.int8).contiguous() if sinks is not None
              else torch.zeros(1, dtype=torch.int8, device=dev))
    mask_t, sm, mask_kind, mask_floor = _mask_arg(keys, dev)
    if per_group:
        out = torch.empty(B, H, Q, num_groups, D, dtype=torch.float32, device=dev)  # [B,H,Q,G,D]
        so = (out.stride(0), out.stride(1), out.stride(2), out.stride(3), out.stride(4))
        lse = torch.empty(B, H, Q, num_groups, dtype=torch.float32, device=dev)  # [B,H,Q,G]
    else:
        out = torch.empty(B, H, Q, D, dtype=q.dtype, device=dev)  # [B,H,Q,D]
        so = (out.stride(0), out.stride(1), out.stride(2), 0, out.stride(3))
        lse = torch.empty(B, H, Q, 1, dtype=torch.float32, device=dev)  # [B,H,Q,1]
    if group_bias is not None:
        bias = group_bias.to(device=dev, dtype=torch.float32)
        sb = (bias.stride(0) if bias.shape[0] > 1 else 0, bias.stride(1), bias.stride(2))
    else:
        bias, sb = torch.zeros(1, dtype=torch.float32, device=dev), (0, 0, 0)
    grid = (_cdiv(Q, BM), B * H, n_lists)
    _fwd_kernel[grid](
        q, k, v, grp, sink_t, idx, cnt, bias, mask_t, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *so, *lse.stride(), *sb,
        idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1), *sm,
        H, Q, K, D, H // Hkv, float(scale), int(keys.window or 0), mask_floor,
        CAUSAL=keys.structured and keys.causal, HAS_WINDOW=keys.window is not None, HAS_SINKS=sinks is not None,
        PER_GROUP=per_group, HAS_BIAS=group_bias is not None, MASK_KIND=mask_kind, UPCAST=upcast, PREC=prec,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, **_launch_options(num_warps, num_stages),
    )
    return out, lse


def _check_groups(num_groups: int) -> None:
    if not 1 <= num_groups <= MAX_GROUPS:
        raise ValueError(f"the triton backend supports 1..{MAX_GROUPS} token groups, got {num_groups}")


def _keys(q, k, mask, causal, key_padding, window, num_sinks) -> KeyMask:
    return KeyMask.build(q.shape[2], k.shape[2], mask=mask, causal=causal, key_padding=key_padding, window=window,
                         num_sinks=num_sinks)


def group_partials(q, k, v, key_group, num_groups, *, scale, mask=None, causal=True, key_padding=None, window=None,
                   num_sinks=0, block_m: int = 64, block_n: int = 64, num_warps: int | None = None,
                   num_stages: int | None = None):
    """``(out_g [B,H,Q,G,D] fp32, lse_g [B,H,Q,G] fp32)``; see :func:`attnkit.kernels.grouped.group_partials`.
    ``block_m``, ``block_n``, ``num_warps``, ``num_stages``: the launch configuration (benchmarks/triton_sweep.py
    compares them on a card)."""
    _check_groups(num_groups)
    return _forward(q, k, v, key_group, num_groups=num_groups, per_group=True, group_bias=None, scale=scale,
                    keys=_keys(q, k, mask, causal, key_padding, window, num_sinks), block_m=block_m, block_n=block_n,
                    num_warps=num_warps, num_stages=num_stages)


def biased_attention(q, k, v, key_group, group_bias, *, scale, mask=None, causal=True, key_padding=None, window=None,
                     num_sinks=0, block_m: int = 64, block_n: int = 64, num_warps: int | None = None,
                     num_stages: int | None = None, return_lse: bool = False):
    """Single-accumulator attention with ``group_bias [B|1,H,G]`` (or None) → ``[B,H,Q,D]`` in q's dtype."""
    if group_bias is not None:
        _check_groups(group_bias.shape[-1])
    out, lse = _forward(q, k, v, key_group, num_groups=1, per_group=False, group_bias=group_bias, scale=scale,
                        keys=_keys(q, k, mask, causal, key_padding, window, num_sinks), block_m=block_m,
                        block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    return (out, lse[..., 0]) if return_lse else out


def _query_ranges(keys: KeyMask, B: int, *, block_m: int, block_n: int, dev):
    """Per (sample, key block) the query-block range ``[lo, hi)`` that can see the block: ``[B,nkb]`` int32 each."""
    Q, K = keys.q_len, keys.k_len
    nqb, nkb = _cdiv(Q, block_m), _cdiv(K, block_n)
    tiles = mask_blocks(keys, block_m, block_n, dev)  # [B|1,nqb,nkb] or None
    if tiles is not None:  # explicit mask: first and last query block with an allowed pair in the key block
        qb = torch.arange(nqb, device=dev)[None, :, None]  # [1,nqb,1]
        lo = torch.where(tiles, qb, nqb).amin(1)  # [B|1,nkb]
        hi = torch.where(tiles, qb + 1, 0).amax(1)
        lo = torch.minimum(lo, hi)
        return lo.expand(B, nkb).to(torch.int32).contiguous(), hi.expand(B, nkb).to(torch.int32).contiguous()
    causal, window, sinks = keys.causal, keys.window, keys.sinks(dev)
    kb = torch.arange(nkb, device=dev)
    k_lo, k_hi = kb * block_n, torch.clamp((kb + 1) * block_n, max=K) - 1
    lo = torch.zeros(nkb, dtype=torch.long, device=dev)
    if causal:
        lo = torch.clamp(k_lo - (K - Q), min=0) // block_m
    hi = torch.full((B, nkb), nqb, dtype=torch.long, device=dev)
    if window is not None:
        last = k_hi + window - 1 - (K - Q)  # last query index within the band
        band_hi = torch.clamp(torch.div(last, block_m, rounding_mode="floor") + 1, min=0, max=nqb)  # [nkb]
        if sinks is not None:
            spad = torch.zeros(sinks.shape[0], nkb * block_n - K, dtype=torch.bool, device=dev)
            has_sink = torch.cat([sinks, spad], 1).view(-1, nkb, block_n).any(-1)  # [B|1,nkb]
            hi = torch.where(has_sink, hi, band_hi[None]).expand(B, nkb)
        else:
            hi = band_hi[None].expand(B, nkb)
    lo = lo[None].expand(B, nkb)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def key_mass(q, k, *, scale, mask=None, causal=True, key_padding=None, query_select=None, window=None, num_sinks=0,
             block_m: int = 64, block_n: int = 64, num_warps: int | None = None, num_stages: int | None = None):
    """``[B,H,K]`` fp32 column mass; see :func:`attnkit.kernels.stats.key_mass`. Two passes: row LSE, then columns."""
    B, H, Hkv, Q, K, D = check_shapes(q, k)
    BM, BN, BD = _blocks(D, block_m, block_n)
    upcast, prec = _dtype_flags(q)
    dev = q.device
    keys = _keys(q, k, mask, causal, key_padding, window, num_sinks)
    key_group = torch.zeros(B, K, dtype=torch.int32, device=dev)
    _, lse = biased_attention(q, k, k, key_group, None, scale=scale, mask=keys, block_m=BM, block_n=BN,
                              num_warps=num_warps, num_stages=num_stages, return_lse=True)
    grp = _key_labels(key_group, keys.key_padding, B, K, dev)
    sinks = keys.sinks(dev)
    sink_t = (sinks.expand(B, K).to(torch.int8).contiguous() if sinks is not None
              else torch.zeros(1, dtype=torch.int8, device=dev))
    sel = (query_select.to(device=dev, dtype=torch.float32).contiguous() if query_select is not None
           else torch.zeros(1, dtype=torch.float32, device=dev))
    lo, hi = _query_ranges(keys, B, block_m=BM, block_n=BN, dev=dev)
    mask_t, sm, mask_kind, mask_floor = _mask_arg(keys, dev)
    out = torch.empty(B, H, K, dtype=torch.float32, device=dev)  # [B,H,K]
    nkb = _cdiv(K, BN)
    _key_mass_kernel[(nkb, B * H)](
        q, k, grp, sink_t, sel, lse, lo, hi, mask_t, out,
        *q.stride(), *k.stride(), *lse.stride(), *out.stride(), *sm,
        H, Q, K, D, H // Hkv, float(scale), int(keys.window or 0), nkb, mask_floor,
        CAUSAL=keys.structured and keys.causal, HAS_WINDOW=keys.window is not None, HAS_SINKS=sinks is not None,
        HAS_SEL=query_select is not None, MASK_KIND=mask_kind, UPCAST=upcast, PREC=prec,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, **_launch_options(num_warps, num_stages),
    )
    return out
