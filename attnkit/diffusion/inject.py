"""Injection primitives: what the editing methods do to one attention call's q/k/v (inside ``edit_kv``) or to its
probabilities (inside ``edit_probs``). Pure tensor functions, each checked by hand in the tests.

Shapes: ``q [B, H, Q, D]``, ``k``/``v`` ``[B, H, K, D]``, ``rows`` a bool ``[B]`` of the batch rows edited.
Nothing here builds a ``[Q, K]`` matrix except :func:`blend_maps` (it works on maps the caller already has) and
:func:`region_bias` (a per-query-row key mask, only for the two-region variants).

Example (FreeCustom's worked example, METHODS-2.md §5.3: own keys with logits [0, 0], one reference with two keys
of logit 0, mask [1, 0], weight 3):
    >>> import torch
    >>> q = torch.zeros(1, 1, 1, 2); k = torch.zeros(1, 1, 2, 2); v = torch.eye(2).view(1, 1, 2, 2)
    >>> k2, v2, bias = append_kv(k, v, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2),
    ...                          ref_bias=reference_bias(torch.tensor([[1.0, 0.0]]), weight=3.0),
    ...                          rows=torch.tensor([True]))
    >>> scores = (q @ k2.transpose(-1, -2)) + bias
    >>> [round(p, 5) for p in torch.softmax(scores, -1).flatten().tolist()]   # 1/(2+e³), 1/(2+e³), e³/(2+e³), 0
    [0.04528, 0.04528, 0.90944, 0.0]
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _rows(rows, batch: int, device) -> torch.Tensor:
    """A bool ``[B]`` from None (every row), a bool tensor, or row indices."""
    if rows is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    rows = torch.as_tensor(rows, device=device)
    if rows.dtype == torch.bool:
        return rows
    out = torch.zeros(batch, dtype=torch.bool, device=device)
    out[rows.long()] = True
    return out


def _broadcast_rows(ref: torch.Tensor, batch: int) -> torch.Tensor:
    """A reference with 1 or ``batch`` rows (or a divisor of it: one sample's rows, repeated) → ``batch`` rows."""
    if ref.shape[0] == batch:
        return ref
    if batch % ref.shape[0]:
        raise ValueError(f"a reference with {ref.shape[0]} rows cannot be broadcast over a batch of {batch}")
    return ref.repeat(batch // ref.shape[0], *([1] * (ref.dim() - 1)))


def replace_kv(k, v, k_ref, v_ref, rows=None, keys=None):
    """K/V of the ``rows`` replaced by the reference's (``keys``: bool ``[K]`` or ``[B, K]`` — replace only those key
    positions, e.g. the image tokens of a joint attention; the reference must then have the same key count).

    Example (MasaCtrl's worked example: the target row reads the source's keys and values):
        >>> k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])   # [src, tgt]
        >>> k2, _ = replace_kv(k, k, k[:1], k[:1], rows=torch.tensor([False, True]))
        >>> torch.equal(k2[1], k[0])
        True
    """
    rows = _rows(rows, k.shape[0], k.device)
    k_ref, v_ref = _broadcast_rows(k_ref.to(k), k.shape[0]), _broadcast_rows(v_ref.to(v), v.shape[0])
    if keys is None:
        if k_ref.shape[2] != k.shape[2] and not bool(rows.all()):
            raise ValueError("a reference with another key count can replace the keys of every row only")
        if bool(rows.all()):
            return k_ref, v_ref
        sel = rows.view(-1, 1, 1, 1)
        return torch.where(sel, k_ref, k), torch.where(sel, v_ref, v)
    keys = keys.to(k.device)
    sel = rows.view(-1, 1, 1, 1) & (keys.view(1, 1, -1, 1) if keys.dim() == 1 else keys[:, None, :, None])
    return torch.where(sel, k_ref, k), torch.where(sel, v_ref, v)


def append_kv(k, v, k_ref, v_ref, ref_bias=None, rows=None):
    """``[K; K_ref]``, ``[V; V_ref]`` for every row, and the additive key bias ``[B, 1, 1, K + K_ref]``: 0 on the own
    keys, ``ref_bias`` (``[B|1, K_ref]``, e.g. :func:`reference_bias`) on the appended keys of the ``rows``, ``-inf``
    on the appended keys of the other rows (they attend as before)."""
    batch = k.shape[0]
    rows = _rows(rows, batch, k.device)
    k_ref, v_ref = _broadcast_rows(k_ref.to(k), batch), _broadcast_rows(v_ref.to(v), batch)
    n_own, n_ref = k.shape[2], k_ref.shape[2]
    extra = torch.zeros(batch, n_ref, device=k.device) if ref_bias is None else \
        _broadcast_rows(ref_bias.to(device=k.device, dtype=torch.float32), batch)  # [B, K_ref]
    extra = torch.where(rows[:, None], extra, torch.full_like(extra, NEG_INF))
    bias = torch.cat([torch.zeros(batch, n_own, device=k.device), extra], dim=1)  # [B, K + K_ref]
    return torch.cat([k, k_ref], 2), torch.cat([v, v_ref], 2), bias[:, None, None, :]


def reference_bias(mask: torch.Tensor, weight: float | torch.Tensor = 0.0) -> torch.Tensor:
    """FreeCustom's per-key logit term: ``+weight`` where ``mask = 1``, ``-inf`` where it is 0 (the weight is added
    to the logit, so 3 multiplies the unnormalised probability by e³). mask ``[B|1, K_ref]`` → ``[B|1, K_ref]``.

    Example:
        >>> reference_bias(torch.tensor([[1.0, 0.0]]), 3.0).tolist()
        [[3.0, -inf]]
    """
    mask = mask.float()
    weight = torch.as_tensor(weight, dtype=torch.float32, device=mask.device)
    return torch.where(mask > 0.5, weight.expand_as(mask) if weight.dim() else weight + torch.zeros_like(mask),
                       torch.full_like(mask, NEG_INF))


def blend_queries(q, q_ref, gamma: float, rows=None, positions=None):
    """StyleID's query preservation ``q̃ = γ q_ref + (1 − γ) q`` on the ``rows`` (``positions``: bool ``[Q]`` — only
    those query positions, e.g. image tokens of a joint attention).

    Example (METHODS-2.md §5.1):
        >>> blend_queries(torch.tensor([0.0, 1.0]).view(1, 1, 1, 2), torch.tensor([1.0, 0.0]).view(1, 1, 1, 2),
        ...               0.75).flatten().tolist()
        [0.75, 0.25]
    """
    rows = _rows(rows, q.shape[0], q.device)
    q_ref = _broadcast_rows(q_ref.to(q), q.shape[0])
    mixed = (gamma * q_ref.float() + (1.0 - gamma) * q.float()).to(q.dtype)  # blended in fp32
    sel = rows.view(-1, 1, 1, 1)
    if positions is not None:
        sel = sel & positions.to(q.device).view(1, 1, -1, 1)
    return torch.where(sel, mixed, q)


def scale_queries(q, factor: float, rows=None, positions=None):
    """Multiply the logits of the ``rows`` by ``factor`` (StyleID's temperature τ), folded into q: ``softmax(τ q kᵀ s)``
    equals ``softmax((τ q) kᵀ s)``, so the fused SDPA path stays in use."""
    if factor == 1.0:
        return q
    rows = _rows(rows, q.shape[0], q.device)
    sel = rows.view(-1, 1, 1, 1)
    if positions is not None:
        sel = sel & positions.to(q.device).view(1, 1, -1, 1)
    return torch.where(sel, q * factor, q)


def key_mask_bias(mask: torch.Tensor, rows=None, threshold: float = 0.5) -> torch.Tensor:
    """``-inf`` on the keys whose ``mask`` (``[B|1, K]`` in [0, 1]) is at least ``threshold``, for the ``rows`` only →
    ``[B, 1, 1, K]`` (DesignEdit's ``neg_inf`` key masking, MasaCtrl's fg/bg key masks).

    Example (DesignEdit's worked example, the third key in the hole):
        >>> bias = key_mask_bias(torch.tensor([[0.0, 0.0, 1.0]]))
        >>> scores = torch.tensor([1.0, 1.0, 4.0]) / 2 ** 0.5 + bias.flatten()
        >>> [round(p, 4) for p in torch.softmax(scores, -1).tolist()]
        [0.5, 0.5, 0.0]
    """
    batch = mask.shape[0] if rows is None else len(_rows(rows, mask.shape[0], mask.device))
    mask = _broadcast_rows(mask.float(), batch)
    sel = _rows(rows, batch, mask.device)[:, None] & (mask >= threshold)
    return torch.where(sel, torch.full_like(mask, NEG_INF), torch.zeros_like(mask))[:, None, None, :]


def region_bias(query_region: torch.Tensor, key_region: torch.Tensor, rows=None) -> torch.Tensor:
    """Two-region attention (MasaCtrl's mask variant with binary masks): a query in region 1 sees only keys in region
    1, a query in region 0 only keys in region 0 → additive ``[B, 1, Q, K]`` (0 / ``-inf``) for the ``rows``, 0
    elsewhere. Equals ``M_t·out_fg + (1 − M_t)·out_bg`` of the two masked passes. This is a ``[Q, K]`` boolean.

    Example (METHODS-2.md §5.2: source keys [fg, bg]; a target query in the fg region, one in the bg region):
        >>> region_bias(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))[0, 0].tolist()
        [[0.0, -inf], [-inf, 0.0]]
    """
    qr, kr = query_region.float() > 0.5, key_region.float() > 0.5  # [B|1, Q], [B|1, K]
    same = qr[:, :, None] == kr[:, None, :]  # [B|1, Q, K]
    if rows is not None:
        rows = torch.as_tensor(rows, device=same.device)
        if rows.dtype != torch.bool:
            raise ValueError("region_bias: rows must be a bool [B] tensor")
        same = _broadcast_rows(same, rows.shape[0]) | ~rows[:, None, None]  # rows not edited: every key allowed
    return torch.where(same, 0.0, NEG_INF)[:, None]  # [B|1, 1, Q, K]


def blend_maps(probs: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """FateZero's self-attention fusion per query row: ``keep_i · A[i] + (1 − keep_i) · A_ref[i]``.
    probs/reference ``[B, H, Q, K]``, keep ``[B|1, Q]`` in [0, 1] (0 everywhere = full replacement).

    Example:
        >>> a = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).view(1, 1, 2, 2); r = torch.full((1, 1, 2, 2), 0.5)
        >>> blend_maps(a, r, torch.tensor([[1.0, 0.0]]))[0, 0].round(decimals=4).tolist()   # row 0 kept, row 1 replaced
        [[0.8999999761581421, 0.10000000149011612], [0.5, 0.5]]
    """
    keep = keep.to(probs)[:, None, :, None]  # [B|1, 1, Q, 1]
    return keep * probs + (1 - keep) * reference.to(probs)


def resize_token_mask(mask: torch.Tensor, height: int, width: int, mode: str = "nearest") -> torch.Tensor:
    """A mask ``[B|1, h, w]`` (or ``[h, w]``) resized to a layer's token grid → ``[B|1, height·width]``.

    Example:
        >>> resize_token_mask(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 4, 4).view(4, 4)[:, :2].tolist()
        [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    """
    mask = mask.float()
    if mask.dim() == 2:
        mask = mask[None]
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = torch.nn.functional.interpolate(mask[:, None], size=(height, width), mode=mode, **kwargs)
    return out[:, 0].flatten(1)  # [B|1, height·width]
