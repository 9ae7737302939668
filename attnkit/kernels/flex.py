"""The ``flex`` backend: PyTorch FlexAttention, compiled, for pre-softmax edits under the model's own mask.

Every edit becomes part of one ``flex_attention`` call (no ``[Q, K]`` score or probability tensor):

* ``score_mod``, in the eager reference's order: logit soft-capping ``tanh(s / c) · c`` (Gemma2 — the ``torch``
  backend cannot run it), ``query_scale`` factors (per head or per row), ``score_bias`` (any bias broadcastable to
  ``[B,H,Q,K]``, read by index: a ``[B,1,1,K]`` key bias stays ``O(K)``) and the values of an additive float mask;
* ``block_mask`` + ``mask_mod``: the model's mask. A causal + padding (+ window + sinks) mask is a ``mask_mod`` of
  indices with a :class:`~torch.nn.attention.flex_attention.BlockMask` built from block bounds (``O((N/128)²)``, no
  ``[Q, K]`` tensor); any other mask (bidirectional image blocks, prefix or chunked masks) is read from the model's
  own tensor, its block structure from a block-wise any/all reduction of it;
* ``edit_output`` after the call.

Shapes are padded to multiples of :data:`BLOCK` (the padding is masked out), so prompts of similar length share one
compiled kernel; every new padded shape compiles once (10–50 s on this 2-core CPU). Decode steps (``Q ≤``
:data:`DECODE_ROWS`) do not go through flex — a new key length each step would compile each step — but through the
eager reference, which costs ``O(Q·K)`` there and computes the same values.

Post-softmax group edits (``group_factors``) need each group's log-sum-exp: compiled flex returns it on CUDA, so
there :func:`flex_group_partials` runs one call per group with a per-group ``mask_mod`` (blocks holding no key of
the group are skipped: about one pass in total). On CPU compiled flex refuses ``return_lse`` (``NotImplementedError``
in torch 2.13: "torch.compile on CPU only supports inference and `return_lse` is not supported yet") and eager flex
materialises ``[Q, K]``, so ``flex`` declares ``group_factors`` on CUDA only (:mod:`attnkit.kernels.backends`). Key
statistics (``key_stats``) use the ``torch`` backend's chunked column pass. ``dynamic=True`` compilation fails on
this CPU (an inductor C++ error), hence one kernel per padded shape.

Costs on this CPU (``benchmarks/attention.py``, ``benchmarks/scaling.py``): compiled flex is slower than the fused
SDPA kernels the ``torch`` backend uses, so ``auto`` never picks ``flex`` on CPU; ask for ``backend="flex"``.

Example:
    >>> import torch
    >>> from attnkit.kernels.masks import KeyMask
    >>> block_mask = structured_block_mask(KeyMask.build(200, 200), 1, "cpu")
    >>> block_mask.shape, block_mask.kv_num_blocks.flatten().tolist()      # padded to 256: 2 × 2 blocks, causal
    ((1, 1, 256, 256), [1, 1])
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from attnkit.kernels.backends import flex_unavailable
from attnkit.kernels.eager import (eager_attention, output_stage, real_queries, repeat_kv, reweight_groups,
                                   wanting_stats)
from attnkit.kernels.masks import KeyMask, _floor, check_shapes
from attnkit.kernels.plan import query_factors, restrict_bias, select_heads
from attnkit.kernels.stats import key_mass

__all__ = ["flex_attention", "flex_available", "structured_block_mask", "explicit_block_mask",
           "flex_group_partials", "flex_biased_attention", "flex_row_probs", "BLOCK", "DECODE_ROWS"]

#: FlexAttention's block size (queries and keys); shapes are padded to multiples of it
BLOCK = 128
#: calls with at most this many query rows run the eager reference (O(Q·K)) instead of compiling a kernel
DECODE_ROWS = 8
#: how many compiled shapes dynamo may keep for flex before it would fall back to eager flex (which materialises)
RECOMPILE_LIMIT = 256


def flex_available(device_type: str = "cpu") -> str | None:
    """None when compiled FlexAttention can run on ``device_type``, else the reason.

    Example:
        >>> flex_available("mps") is not None
        True
    """
    return flex_unavailable(device_type)


@functools.lru_cache(maxsize=None)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


#: the kernel options of the retry when every block configuration flex tried needs more shared memory than the card
#: has (seen on an H200 with torch 2.11: fp16 with per-head score_mods asked 311 KB of the 227 KB there)
SMALL_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1, "num_warps": 4}

_COMPILED = _compiled  # tests swap _compiled for uncompiled flex, which returns the LSE on CPU too


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


# --------------------------------------------------------------------------------------------------------
# block masks without a [Q, K] tensor
# --------------------------------------------------------------------------------------------------------
def _from_block_flags(partial: torch.Tensor, full: torch.Tensor, Qp: int, Kp: int, mask_mod):
    """A BlockMask over padded lengths ``Qp, Kp`` from bool ``[B,H,nq,nk]`` block flags: ``partial`` (some pair
    allowed, not all: ``mask_mod`` decides pair by pair) and ``full`` (every pair allowed)."""
    from torch.nn.attention.flex_attention import BlockMask

    def lists(flags):
        counts = flags.sum(-1, dtype=torch.int32)  # [B,H,nq]
        order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # allowed blocks first
        return counts.contiguous(), order.contiguous()

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(Qp, Kp))


def _structured_mask_mod(keys: KeyMask, device):
    """``mask_mod`` of a structured KeyMask over padded lengths: key positions ``>= K`` are never allowed."""
    Q, K = keys.q_len, keys.k_len
    offset, causal, window = K - Q, keys.causal, keys.window
    Kp = _padded(K)
    padding = None if keys.key_padding is None else F.pad(keys.key_padding.to(device=device, dtype=torch.bool),
                                                          (0, Kp - K))  # [B|1,Kp]
    sinks = keys.sinks(device)
    sinks = None if sinks is None else F.pad(sinks, (0, Kp - K))  # [B|1,Kp]
    pb = padding is not None and padding.shape[0] > 1
    sb = sinks is not None and sinks.shape[0] > 1
    tail = Kp > K and padding is None

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        ok = kv_idx <= pos if causal else kv_idx >= 0
        if tail:
            ok = ok & (kv_idx < K)
        if window is not None:
            near = pos - kv_idx < window
            if sinks is not None:
                near = near | sinks[b if sb else 0, kv_idx]
            ok = ok & near
        if padding is not None:
            ok = ok & padding[b if pb else 0, kv_idx]
        return ok

    return mask_mod


def structured_block_mask(keys: KeyMask, B: int, device):
    """BlockMask of a structured :class:`KeyMask` (causal, key padding, window + sinks) over the lengths padded to
    :data:`BLOCK`, built from block bounds only: ``O(B·(Q/128)·(K/128))`` work and memory. Blocks marked full are
    exactly all-allowed; partial ones are masked by the ``mask_mod`` pair by pair."""
    Q, K = keys.q_len, keys.k_len
    Qp, Kp = _padded(Q), _padded(K)
    nq, nk = Qp // BLOCK, Kp // BLOCK
    offset = K - Q
    p_lo = torch.arange(nq, device=device) * BLOCK + offset  # [nq] first query position of each block
    p_hi = torch.arange(1, nq + 1, device=device) * BLOCK - 1 + offset  # last (padded rows see everything real)
    j_lo = torch.arange(nk, device=device) * BLOCK  # [nk]
    j_hi = torch.arange(1, nk + 1, device=device) * BLOCK - 1
    any_ok = torch.ones(1, nq, nk, dtype=torch.bool, device=device)  # [1|B,nq,nk]
    all_ok = (j_hi < K)[None, None, :].expand(1, nq, nk)  # a block reaching past K is never full
    if keys.causal:
        any_ok = any_ok & (j_lo[None] <= p_hi[:, None])
        all_ok = all_ok & (j_hi[None] <= p_lo[:, None])
    if keys.window is not None:
        near_any = (p_lo[:, None] - j_hi[None]) < keys.window  # some pair within the window
        sinks = keys.sinks(device)
        if sinks is not None:
            has_sink = F.pad(sinks, (0, Kp - K)).view(sinks.shape[0], nk, BLOCK).any(-1)  # [B|1,nk]
            near_any = near_any[None] | has_sink[:, None, :]
        any_ok = any_ok & near_any
        all_ok = all_ok & ((p_hi[:, None] - j_lo[None]) < keys.window)
    if keys.key_padding is not None:
        pad = F.pad(keys.key_padding.to(device=device, dtype=torch.bool), (0, Kp - K)).view(-1, nk, BLOCK)
        any_ok = any_ok & pad.any(-1)[:, None, :]
        all_ok = all_ok & pad.all(-1)[:, None, :]
    any_ok = any_ok & (j_lo < K)[None, None, :]
    full = (all_ok & any_ok).expand(B, nq, nk)[:, None]  # [B,1,nq,nk]
    partial = (any_ok & ~all_ok).expand(B, nq, nk)[:, None]
    return _from_block_flags(partial.contiguous(), full.contiguous(), Qp, Kp, _structured_mask_mod(keys, device))


def explicit_block_mask(allowed: torch.Tensor, B: int, mask_mod):
    """BlockMask of an explicit bool mask ``allowed [B|1, H|1, Qp, Kp]`` (the model's own, padded to multiples of
    :data:`BLOCK` with False), reduced one block row at a time."""
    Bm, Hm, Qp, Kp = allowed.shape
    nq, nk = Qp // BLOCK, Kp // BLOCK
    any_ok = torch.zeros(Bm, Hm, nq, nk, dtype=torch.bool, device=allowed.device)
    all_ok = torch.zeros(Bm, Hm, nq, nk, dtype=torch.bool, device=allowed.device)
    for i in range(nq):
        rows = allowed[:, :, i * BLOCK:(i + 1) * BLOCK].reshape(Bm, Hm, BLOCK, nk, BLOCK)
        any_ok[:, :, i] = rows.any(-1).any(2)
        all_ok[:, :, i] = rows.all(-1).all(2)
    full = (all_ok & any_ok).expand(B, Hm, nq, nk)
    partial = (any_ok & ~all_ok).expand(B, Hm, nq, nk)
    return _from_block_flags(partial.contiguous(), full.contiguous(), Qp, Kp, mask_mod)


def _index(t: torch.Tensor, b, h, q, kv):
    """``t`` (4-D, broadcastable to ``[B,H,Q,K]``) read at (b, h, q, kv), size-1 dimensions broadcast."""
    return t[b if t.shape[0] > 1 else 0, h if t.shape[1] > 1 else 0, q if t.shape[2] > 1 else 0,
             kv if t.shape[3] > 1 else 0]


def _as4d(t: torch.Tensor) -> torch.Tensor:
    return t.view(*([1] * (4 - t.dim())), *t.shape) if t.dim() < 4 else t


def _pad4d(t: torch.Tensor | None, Q: int, K: int, value: float = 0.0) -> torch.Tensor | None:
    """A 4-D tensor whose query / key dimensions (when not broadcast) are padded to multiples of :data:`BLOCK`."""
    if t is None:
        return None
    t = _as4d(t)
    pad_k = _padded(K) - K if t.shape[3] == K and K > 1 else 0
    pad_q = _padded(Q) - Q if t.shape[2] == Q and Q > 1 else 0
    return F.pad(t, (0, pad_k, 0, pad_q), value=value) if pad_k or pad_q else t


def _mask_for(keys: KeyMask, B: int, device):
    """``(block_mask, additive float mask [B|1,H|1,Qp|1,Kp] | None)`` for the call's mask (padded lengths)."""
    if keys.structured:
        return structured_block_mask(keys, B, device), None
    Q, K = keys.q_len, keys.k_len
    explicit = _as4d(keys.explicit)
    if explicit.dtype == torch.bool or not explicit.is_floating_point():
        allowed, add = (explicit if explicit.dtype == torch.bool else explicit != 0), None
    else:
        allowed = explicit > _floor(explicit.dtype)
        add = explicit.float().masked_fill(~allowed, 0.0)
        add = add if bool(add.ne(0).any()) else None
    allowed = allowed.expand(allowed.shape[0], allowed.shape[1], Q, K)
    allowed = F.pad(allowed, (0, _padded(K) - K, 0, _padded(Q) - Q), value=False)  # [B|1,H|1,Qp,Kp]

    def mask_mod(b, h, q_idx, kv_idx):
        return _index(allowed, b, h, q_idx, kv_idx)

    return explicit_block_mask(allowed, B, mask_mod), _pad4d(add, Q, K)


def _score_mod(softcap, qscale, bias, add):
    """One score_mod: soft-capping, then query factors, then the bias, then an additive mask's values."""
    if softcap is None and qscale is None and bias is None and add is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        if qscale is not None:
            score = score * _index(qscale, b, h, q_idx, 0)
        if bias is not None:
            score = score + _index(bias, b, h, q_idx, kv_idx)
        if add is not None:
            score = score + _index(add, b, h, q_idx, kv_idx)
        return score

    return score_mod


def _run(q, k, v, *, scale, score_mod, block_mask, lse: bool = False):
    """Compiled flex on ``q [B,H,Q,D]``, ``k/v [B,Hkv,K,D]`` padded to multiples of :data:`BLOCK` (GQA native) →
    ``out [B,H,Q,D]`` (and ``lse [B,H,Q]``), the padding cut off."""
    Q, K = q.shape[2], k.shape[2]
    pq, pk = _padded(Q) - Q, _padded(K) - K
    qp, kp, vp = F.pad(q, (0, 0, 0, pq)), F.pad(k, (0, 0, 0, pk)), F.pad(v, (0, 0, 0, pk))
    limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)

    def call(options):
        return _compiled()(qp, kp, vp, score_mod=score_mod, block_mask=block_mask, scale=scale,
                           enable_gqa=q.shape[1] != k.shape[1], return_lse=lse, kernel_options=options)

    with torch._dynamo.config.patch(recompile_limit=limit), _quiet_inductor():
        try:
            result = call(None)
        except Exception as err:  # noqa: BLE001  (inductor wraps the Triton error in its own type)
            if "out of resource" not in str(err):
                raise
            result = call(SMALL_BLOCKS)
    if lse:
        return result[0][:, :, :Q], result[1][:, :, :Q]
    return result[:, :, :Q]


@contextlib.contextmanager
def _quiet_inductor():
    """Inductor's C++ compiler warnings are noise for a user; errors still raise."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------------------
# the backend function
# --------------------------------------------------------------------------------------------------------
def flex_attention(q, k, v, mask, *, scaling, entries, make_ctx, causal=True, softcap=None, dropout=0.0,
                   rows: torch.Tensor | None = None):
    """Attention with query_scale / score_bias / softcap / key_stats / edit_output (and, on CUDA, group_factors)
    under the model's ``mask`` through compiled FlexAttention → out ``[B,H,Q,D]`` (with ``rows``: ``(out, probs
    [B,H,R,K])`` of those query rows, from the same factors and biases; no hook runs twice). Decode steps
    (``Q ≤ DECODE_ROWS``) run the eager reference, ``O(Q·K)``."""
    from attnkit.kernels.torch_path import _contexts, grouped_attention

    if dropout > 0.0:
        raise ValueError("the flex backend does not support attention dropout; use backend='eager' for training")
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    if Q <= DECODE_ROWS:  # a new key length every step would compile every step
        out, probs = eager_attention(q, k, v, mask, scaling=scaling, entries=entries, make_ctx=make_ctx,
                                     causal=causal, softcap=softcap, rows=rows)
        return out if rows is None else (out, probs)
    ctx_of = _contexts(make_ctx)
    window = getattr(ctx_of(entries[0]), "window", None) if entries else None
    keys = KeyMask.build(Q, K, mask=mask, causal=causal, window=window)
    ctx_of.attach(keys)
    qscale, bias = None, None
    for entry in entries:
        iv, caps = entry.intervention, entry.caps
        if "query_scale" in caps or "score_bias" in caps:
            ctx, heads = ctx_of(entry), entry.heads_on(q.device)
            if "query_scale" in caps:
                f = query_factors(iv.query_scale(ctx), heads)  # [B|1,H,Q|1,1]
                qscale = f if qscale is None else qscale * f
            if "score_bias" in caps:
                b = iv.score_bias(ctx)
                if b is not None:
                    b = _as4d(restrict_bias(b, heads))
                    bias = b if bias is None else bias + b
    if softcap is None and qscale is not None:  # without soft-capping a factor on the scores is one on q
        q, qscale = q * qscale.to(q.dtype), None
    for entry, ctx in wanting_stats(entries, ctx_of):
        col = key_mass(q, k, scale=scaling, mask=keys, query_select=real_queries(ctx), backend="torch")  # [B,H,K]
        entry.intervention.key_stats(col, ctx)
    grouped = [e for e in entries if "group_factors" in e.caps]
    applied: list = []
    if grouped:
        out = grouped_attention(q, k, v, keys, grouped, scaling=scaling, make_ctx=ctx_of, kernel="flex",
                                applied=applied, partials=flex_group_partials)
    else:
        block_mask, add = _mask_for(keys, B, q.device)
        score_mod = _score_mod(softcap, _pad4d(qscale, Q, 1, 1.0), _pad4d(bias, Q, K), add)
        out = _run(q, k, v, scale=scaling, score_mod=score_mod, block_mask=block_mask)
        out = _zero_empty_rows(out, bias, add)
    out = output_stage(out, entries, ctx_of)
    if rows is None:
        return out
    return out, flex_row_probs(q, k, keys, rows, scaling=scaling, softcap=softcap, qscale=qscale, bias=bias,
                               applied=applied)


def _zero_empty_rows(out, bias, add):
    """Rows whose every allowed key is biased to -inf come back as NaN from the online softmax: 0, as in the
    reference (rows the mask itself empties are 0 already)."""
    if any(t is not None and bool(torch.isneginf(t).any()) for t in (bias, add)):
        return out.nan_to_num_(0.0)
    return out


def flex_biased_attention(q, k, v, keys: KeyMask, bias: torch.Tensor | None, *, scale: float) -> torch.Tensor:
    """Attention under ``keys`` plus an additive ``bias`` broadcastable to ``[B,H,Q,K]`` (or None) in one compiled
    flex call → ``[B,H,Q,D]`` in q's dtype; rows with no allowed key 0."""
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    block_mask, add = _mask_for(keys, B, q.device)
    bias = None if bias is None else _as4d(bias).float()
    out = _run(q, k, v, scale=scale, score_mod=_score_mod(None, None, _pad4d(bias, Q, K), add), block_mask=block_mask)
    return _zero_empty_rows(out, bias, add)


def flex_row_probs(q, k, keys: KeyMask, rows, *, scaling, softcap=None, qscale=None, bias=None, applied=()):
    """Edited probabilities ``[B,H,R,K]`` (fp32) of the query rows ``rows [R]``, as the flex call computed them."""
    Q = keys.q_len
    scores = torch.matmul(q[:, :, rows].float(), repeat_kv(k, q.shape[1]).float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if qscale is not None:
        scores = scores * (qscale[:, :, rows] if qscale.shape[2] == Q else qscale)
    if bias is not None:
        scores = scores + (bias[:, :, rows] if bias.shape[2] == Q else bias).float()
    _, ok, mask_bias = keys.block(rows, q.device, restrict=False)  # [B|1,H|1,R,K]
    if mask_bias is not None:
        scores = scores + mask_bias
    probs = torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)  # [B,H,R,K]
    for heads, group_ids, factors in applied:
        picked = factors[:, :, rows] if factors.shape[2] == Q else factors
        edited = reweight_groups(probs, group_ids, lambda mass: picked, torch.ones_like(heads), picked.shape[-1])
        probs = select_heads(edited, probs, heads)
    return probs


# --------------------------------------------------------------------------------------------------------
# per-group partials (CUDA: compiled flex returns the LSE there)
# --------------------------------------------------------------------------------------------------------
def _in_group_mask_mod(mask_mod, member: torch.Tensor):
    """``mask_mod`` restricted to the keys where ``member [B, Kp]`` is True.

    The group reaches the compiled kernel as a tensor, never as a Python constant: with the group as a default
    argument (``g=g``), compiled flex on an H200 (torch 2.11) gave groups another group's partials; a captured tensor
    is an input of the compiled graph, and the same run then matched eager (rel. error 2.6e-7)."""
    def in_group(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & member[b, kv_idx]

    return in_group


def flex_group_partials(q, k, v, key_group, num_groups: int, keys: KeyMask, *, scale: float):
    """``(out_g [B,H,Q,G,D], lse_g [B,H,Q,G])`` fp32: one compiled flex call per group with ``return_lse``, its
    ``mask_mod`` the model's mask restricted to the group's keys and its block mask the call's blocks that hold a
    key of the group. Needs compiled flex with ``return_lse`` (CUDA; torch 2.13 refuses it on CPU)."""
    if q.device.type == "cpu" and _compiled is _COMPILED:
        raise ValueError("flex: compiled FlexAttention on CPU cannot return the log-sum-exp (torch 2.13), which group "
                         "partials need; use backend='torch' on CPU")
    B, H, Hkv, Q, K, D = check_shapes(q, k, v)
    base, add = _mask_for(keys, B, q.device)
    score_mod = _score_mod(None, None, None, add)
    Kp = _padded(K)
    grp = F.pad(key_group.to(q.device), (0, Kp - K), value=num_groups)  # [B,Kp]; padding in no group
    present = F.one_hot(grp, num_groups + 1)[..., :num_groups].view(B, Kp // BLOCK, BLOCK, num_groups).any(2)
    dense = base.to_dense().bool()  # [B,H|1,nq,nk] blocks the mask allows at all
    out_g = torch.zeros(B, H, Q, num_groups, D, dtype=torch.float32, device=q.device)
    lse_g = torch.full((B, H, Q, num_groups), float("-inf"), dtype=torch.float32, device=q.device)
    for g in range(num_groups):
        flags = dense & present[:, None, None, :, g]  # [B,H|1,nq,nk]
        block_mask = _from_block_flags(flags, torch.zeros_like(flags), _padded(Q), Kp,
                                       _in_group_mask_mod(base.mask_mod, grp == g))
        out, lse = _run(q, k, v, scale=scale, score_mod=score_mod, block_mask=block_mask, lse=True)
        out_g[:, :, :, g] = torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, out.float())
        lse_g[:, :, :, g] = lse.float()
    return out_g, lse_g
