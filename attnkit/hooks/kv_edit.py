"""The ``edit_kv`` stage: interventions that replace queries, keys or values, or change the key set, run here on the
call's q/k/v **before** the backend (so every backend supports them), and their key biases join the call's mask.

:func:`apply_kv_edits` is called by :func:`attnkit.hooks.runtime.attend` for a site whose plan has ``edit_kv``
entries. Rules (also in the hook table of :mod:`attnkit.interventions.base`):

* entries run in recipe order, each on the previous result; q keeps its shape ``[B,H,Q,D]``, k/v may change their
  key count ``[B,Hkv,K',D]``;
* an entry targeting some heads only keeps the other heads' own q/k/v; that needs a same-shape edit;
* ``key_bias`` (additive, broadcastable to ``[B,H,Q,K']``: per-key logit weights, ``-inf`` masks) is added to the
  model's mask. When keys were added, the first ``K`` keys keep the model's mask and the others are visible to every
  query unless the bias says otherwise;
* the contexts made after the edit report ``k_len = K'``, ``value`` = the new v, ``orig_k_len = K`` and label the
  added keys ``"reference"``.

Example (append two reference keys and give them a +3 logit weight; no ``[Q, K]`` matrix is built):
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from attnkit.kernels.plan import PlanEntry
    >>> class Append:
    ...     def capabilities(self): return {"edit_kv"}
    ...     def edit_kv(self, q, k, v, ctx):
    ...         ref = torch.zeros(1, 1, 2, 2)
    ...         bias = torch.tensor([0.0, 0.0, 3.0, float("-inf")]).view(1, 1, 1, 4)
    ...         return q, torch.cat([k, ref], 2), torch.cat([v, ref], 2), bias
    >>> q = k = v = torch.zeros(1, 1, 1, 2)
    >>> k = torch.zeros(1, 1, 2, 2); v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    >>> make_ctx = lambda entry, rows=None: SimpleNamespace(k_len=2, value=v, spans={}, orig_k_len=None)
    >>> q2, k2, v2, mask, _ = apply_kv_edits([PlanEntry(Append(), torch.ones(1, dtype=torch.bool))], q, k, v, None,
    ...                                      causal=False, make_ctx=make_ctx)
    >>> k2.shape[2], mask.flatten().tolist()
    (4, [0.0, 0.0, 3.0, -inf])
"""

from __future__ import annotations

import torch

from attnkit.kernels.masks import allowed_mask
from attnkit.kernels.plan import entry_caps, select_heads


def kv_entries(entries) -> list:
    """The plan entries of a site that edit q/k/v."""
    return [e for e in entries if "edit_kv" in entry_caps(e)]


def _repeat_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, Hkv, K, D]`` → ``[B, H, K, D]`` (query head h uses kv head ``h // (H // Hkv)``)."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _unpack(result, name: str):
    if isinstance(result, (tuple, list)) and len(result) in (3, 4):
        q, k, v = result[:3]
        return q, k, v, (result[3] if len(result) == 4 else None)
    raise ValueError(f"{name}: edit_kv must return (q, k, v, key_bias) or None, got {type(result).__name__}")


def _check(name: str, q0, q, k, v) -> None:
    if q.shape != q0.shape:
        raise ValueError(f"{name}: edit_kv must keep the query shape {tuple(q0.shape)}, got {tuple(q.shape)}")
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] \
            or k.shape[3] != q.shape[3]:
        raise ValueError(f"{name}: edit_kv returned k {tuple(k.shape)} and v {tuple(v.shape)}; both must be "
                         f"[B={q.shape[0]}, Hkv, K', D={q.shape[3]}] with the same K'")


def _pad_keys(bias: torch.Tensor | None, k_len: int) -> torch.Tensor | None:
    """A bias over fewer keys padded with 0 (no change) for keys added after it."""
    if bias is None or bias.shape[-1] == k_len:
        return bias
    return torch.nn.functional.pad(bias, (0, k_len - bias.shape[-1]))


def merge_key_bias(mask, bias, *, q_len: int, k_len0: int, k_len: int, causal: bool, device):
    """The call's mask after ``edit_kv``: the model's ``mask`` (None, bool or additive float, over ``k_len0`` keys)
    on the first ``k_len0`` keys, keys added after them allowed, plus ``bias`` → additive float
    ``[B|1, H|1, Q|1, k_len]``, or the model's mask unchanged when there is no bias and no key was added."""
    if bias is None and k_len == k_len0:
        return mask
    if k_len < k_len0 and (mask is not None or causal):
        raise ValueError(f"edit_kv removed keys ({k_len0} → {k_len}) from a masked or causal call; only appending "
                         "keys after the model's own keeps its mask meaningful")
    base = None
    allowed = allowed_mask(mask, q_len, k_len0, causal, device)  # [B|1, 1, Q, K0] bool or None
    if allowed is not None:
        base = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
        if mask is not None and mask.dtype != torch.bool and mask.is_floating_point():
            base = torch.where(allowed, mask.float(), base)  # keep a float mask's own bias values
        base = _pad_keys(base, k_len)
    if bias is None:
        return base  # None: nothing masked, the added keys are visible to every query
    bias = bias.to(device=device, dtype=torch.float32)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    return bias if base is None else base + bias


def _context_after(make_ctx, k_len0: int, key: torch.Tensor, value: torch.Tensor):
    """``make_ctx`` whose contexts describe the edited call (k_len, value, spans of the added keys)."""
    k_len = key.shape[2]

    def make(entry, *args, **kwargs):
        ctx = make_ctx(entry, *args, **kwargs)
        if ctx is None:
            return ctx
        ctx.value = value
        if k_len != k_len0:
            ctx.k_len, ctx.orig_k_len = k_len, k_len0
            spans = {}
            for name, m in getattr(ctx, "spans", {}).items():  # [B, K0] → [B, K'], added keys in no span
                spans[name] = (m[..., :k_len] if m.shape[-1] >= k_len else
                               torch.nn.functional.pad(m, (0, k_len - m.shape[-1]), value=False))
            added = torch.arange(k_len, device=key.device) >= k_len0  # [K']
            spans["reference"] = added[None].expand(key.shape[0], -1)
            ctx.spans = spans
        return ctx

    return make


def apply_kv_edits(entries, query, key, value, mask, *, causal: bool, make_ctx):
    """Run every ``edit_kv`` entry of ``entries`` → ``(q, k, v, mask, make_ctx)`` for the rest of the call.

    q ``[B,H,Q,D]``, k/v ``[B,Hkv,K,D]``; the returned mask is the model's mask merged with the key biases (see
    :func:`merge_key_bias`) and ``make_ctx`` makes contexts of the edited call."""
    todo = kv_entries(entries)
    if not todo:
        return query, key, value, mask, make_ctx
    k_len0, bias = key.shape[2], None
    current_ctx = make_ctx
    for entry in todo:
        iv = entry.intervention
        name = getattr(iv, "name", type(iv).__name__)
        result = iv.edit_kv(query, key, value, current_ctx(entry))
        if result is None:
            continue
        q, k, v, b = _unpack(result, name)
        _check(name, query, q, k, v)
        heads = entry.heads_on(query.device)  # [H] bool
        if not bool(heads.all()):
            if k.shape[2] != key.shape[2]:
                raise ValueError(f"{name}: edit_kv changed the key count on some heads only; target every head "
                                 "or keep the key count")
            num_heads = query.shape[1]
            if k.shape[1] != num_heads or key.shape[1] != num_heads:  # GQA: select per query head
                k, v = _repeat_heads(k, num_heads), _repeat_heads(v, num_heads)
                key, value = _repeat_heads(key, num_heads), _repeat_heads(value, num_heads)
            q, k, v = select_heads(q, query, heads), select_heads(k, key, heads), select_heads(v, value, heads)
            if b is not None:
                b = b.float()
                while b.dim() < 4:
                    b = b.unsqueeze(0)
                b = torch.where(heads.view(1, -1, 1, 1), b, torch.zeros((), device=b.device))  # 0 on other heads
        bias = _pad_keys(bias, k.shape[2])
        if b is not None:
            b = b.float()
            bias = b if bias is None else bias + b
        query, key, value = q, k, v
        current_ctx = _context_after(make_ctx, k_len0, key, value)
    mask = merge_key_bias(mask, bias, q_len=query.shape[2], k_len0=k_len0, k_len=key.shape[2], causal=causal,
                          device=query.device)
    return query, key, value, mask, current_ctx
