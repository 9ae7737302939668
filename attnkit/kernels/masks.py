"""Masks: the one description of "which key may each query attend" that every kernel reads.

transformers hands attention functions one of: ``None`` (plain causal, or nothing masked), a bool mask
``[B,1,Q,K]`` (True = attend, from ``sdpa_mask``) or an additive float mask (from ``eager_mask``: 0 = attend,
``finfo.min`` = masked). Masks are *not* always "causal + padding": Gemma3 VLMs attend bidirectionally inside each
image block, other families use prefix or chunked masks, sliding-window layers limit the band.

:class:`KeyMask` wraps whatever the model gave in one of two forms:

* **structured** — bottom-right causal (when ``causal``) & key padding ``[B,K]`` & a sliding window (optionally with
  always-visible sink keys). The fused span decomposition of :mod:`attnkit.kernels.grouped` needs this form. A model
  mask is put in this form only when it *provably* equals it (:func:`recognise`, checked against the mask itself in
  query chunks and cached per mask object, since transformers hands the same mask to every layer);
* **explicit** — the model's own mask, sliced per query chunk by the kernels (exact for any mask, memory
  O(chunk·K) beyond the mask itself). A float mask keeps its values as an additive bias.

Conventions: queries are the last ``Q`` of the ``K`` key positions (query ``i`` sits at ``K-Q+i``); a row with no
allowed key gets output 0 and lse ``-inf`` — never NaN.

Example:
    >>> import torch
    >>> causal_allowed(2, 3).int().tolist()
    [[1, 1, 0], [1, 1, 1]]
    >>> pad = torch.tensor([[False, True, True, True]])               # one left pad
    >>> model_mask = band_allowed(torch.arange(4), torch.arange(4), causal=True, key_padding=pad, sinks=None,
    ...                           window=None)                      # what sdpa_mask builds: [1, 1, 4, 4]
    >>> keys = KeyMask.build(4, 4, mask=model_mask, causal=True)
    >>> keys.structured, keys.key_padding.tolist()
    (True, [[False, True, True, True]])
    >>> block = model_mask.clone(); block[0, 0, 1, 2] = True           # key 2 visible to query 1: bidirectional
    >>> KeyMask.build(4, 4, mask=block, causal=True).structured
    False
    >>> KeyMask.build(4, 4, mask=block, causal=True).visible_counts().tolist()   # keys each row may attend
    [[[0.0, 2.0, 2.0, 3.0]]]
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

__all__ = ["KeyMask", "recognise", "check_shapes", "causal_allowed", "allowed_mask", "band_allowed", "key_index",
           "sink_flags", "query_chunk", "attach_mask"]

# Score-matrix budget (elements) for one query chunk: 2**22 fp32 = 16 MiB.
CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------------
# small helpers
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
    return B, H, Hkv, Q, K, D


def query_chunk(B: int, H: int, Q: int, K: int) -> int:
    """Query-chunk length so that one ``[B,H,C,K]`` fp32 score block stays within ``CHUNK_ELEMENTS``."""
    return int(max(16, min(Q, CHUNK_ELEMENTS // max(1, B * H * K))))


def causal_allowed(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Bool ``[Q, K]``: query i (absolute position ``K-Q+i``) may see key j iff ``j <= K-Q+i`` (bottom-right)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # [Q, 1]
    k_pos = torch.arange(k_len, device=device)[None, :]  # [1, K]
    return k_pos <= q_pos  # [Q, K]


def allowed_mask(mask: torch.Tensor | None, q_len: int, k_len: int, causal: bool, device) -> torch.Tensor | None:
    """Bool ``[B|1, 1, Q, K]`` of allowed pairs for the whole call, or None when every pair is allowed.

    The eager reference uses it; fused paths go through :class:`KeyMask` instead (no second ``[Q, K]`` tensor)."""
    if mask is None:
        if causal and q_len > 1:
            return causal_allowed(q_len, k_len, device)[None, None]  # [1, 1, Q, K]
        return None
    if mask.dtype == torch.bool:
        return mask
    return mask > _floor(mask.dtype)  # additive float mask: 0 = allowed, ~min = masked


def _floor(dtype: torch.dtype) -> float:
    """Additive mask values at or below this mean "masked" (transformers uses ``finfo.min``; -inf also works)."""
    return torch.finfo(dtype).min / 2


def sink_flags(key_padding: torch.Tensor | None, num_sinks: int, K: int, device) -> torch.Tensor | None:
    """``[B|1, K]`` bool: True for the first ``num_sinks`` real keys of each sample (None when no sinks)."""
    if not num_sinks:
        return None
    if key_padding is None:
        return (torch.arange(K, device=device) < num_sinks)[None]  # [1,K]
    real = key_padding.to(torch.bool)
    return real & (real.cumsum(-1) <= num_sinks)  # [B,K]


def band_allowed(qpos: torch.Tensor, kidx: torch.Tensor, *, causal: bool, key_padding: torch.Tensor | None,
                 sinks: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """``[B|1, 1, C, Kr]`` bool of the structured mask: may the query at absolute position ``qpos[c]`` attend key
    ``kidx[r]``. ``key_padding`` and ``sinks`` are the full ``[B|1, K]`` tensors; they are indexed with ``kidx``.

    Example:
        >>> band_allowed(torch.arange(3), torch.arange(3), causal=True, key_padding=None, sinks=None,
        ...              window=2)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
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


def _as_4d(mask: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """A mask broadcastable to ``[B, H, Q, K]`` as a 4-D view (no copy)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dim() != 4 or mask.shape[-1] != k_len or mask.shape[-2] not in (1, q_len):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not fit Q={q_len}, K={k_len}")
    return mask


def _rows_of(mask: torch.Tensor, rows) -> torch.Tensor:
    """Mask rows ``rows`` (a slice or LongTensor of query indices) of a 4-D mask; a broadcast row stays as is."""
    if mask.shape[-2] == 1:
        return mask
    return mask[:, :, rows] if isinstance(rows, slice) else mask.index_select(2, rows.to(mask.device))


def _explicit_block(mask: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ok bool, bias float | None)`` of some rows of an explicit mask, both ``[B|1, H|1, C|1, K]``."""
    part = _rows_of(mask, rows)
    if part.dtype == torch.bool:
        return part, None
    if not part.is_floating_point():  # an integer 0/1 mask: nonzero = attend
        return part != 0, None
    ok = part > _floor(part.dtype)
    return ok, part.float().masked_fill(~ok, 0.0)


def _chunks(q_len: int, k_len: int, batch: int, heads: int = 1):
    size = query_chunk(batch, heads, q_len, k_len)
    for c0 in range(0, q_len, size):
        yield slice(c0, min(q_len, c0 + size))


# --------------------------------------------------------------------------------------------------------
# recognising the standard structure in a model's mask
# --------------------------------------------------------------------------------------------------------
_RECOGNISED: dict[int, tuple] = {}  # id(mask) -> (weakref(mask), version, key, result); a few entries
_RECOGNISED_MAX = 8


def recognise(mask: torch.Tensor, q_len: int, k_len: int, *, causal: bool, window: int | None):
    """Does ``mask`` equal "bottom-right causal (if ``causal``) & key padding & window"? Returns
    ``(True, key_padding [B|1,K] | None)`` — None when no key is padded — or ``(False, None)``.

    The key padding is read off the mask (a key is real iff some query may attend it), then the rebuilt structure
    is compared with the mask in query chunks: O(B·Q·K) work, O(chunk·K) memory, cached per mask object (and its
    in-place version) so a model's many layers pay once per forward.

    Example:
        >>> import torch
        >>> recognise(causal_allowed(3, 3)[None, None], 3, 3, causal=True, window=None)
        (True, None)
        >>> recognise(torch.ones(1, 1, 3, 3, dtype=torch.bool), 3, 3, causal=True, window=None)  # bidirectional
        (False, None)
    """
    mask = _as_4d(mask, q_len, k_len)
    key = (q_len, k_len, bool(causal), window, tuple(mask.shape), mask.dtype)
    hit = _RECOGNISED.get(id(mask))
    if hit is not None and hit[0]() is mask and hit[1] == mask._version and hit[2] == key:
        return hit[3]
    result = _recognise(mask, q_len, k_len, causal=causal, window=window)
    if len(_RECOGNISED) >= _RECOGNISED_MAX:
        _RECOGNISED.pop(next(iter(_RECOGNISED)))
    _RECOGNISED[id(mask)] = (weakref.ref(mask), mask._version, key, result)
    return result


def _recognise(mask, q_len, k_len, *, causal, window):
    B, Hm = mask.shape[0], mask.shape[1]
    if mask.shape[-2] == 1 and q_len > 1 and (causal or window is not None):
        return False, None  # one row broadcast to every query cannot be causal or banded
    real = torch.zeros(B, k_len, dtype=torch.bool, device=mask.device)  # [B|1, K]
    for rows in _chunks(q_len, k_len, B, Hm):
        ok, bias = _explicit_block(mask, rows)  # [B|1, Hm, C, K]
        if bias is not None and bool(bias.ne(0).any()):
            return False, None  # a float mask carrying a real bias: not a pure mask
        real |= ok.any(dim=2).any(dim=1)
    for rows in _chunks(q_len, k_len, B, Hm):
        ok, _ = _explicit_block(mask, rows)  # [B|1, Hm, C, K]
        want = _band_rows(rows.start, ok.shape[-2], q_len, k_len, causal, window, mask.device)  # [C, K]
        want = want & real[:, None, None, :]  # [B|1, 1, C, K]
        if not torch.equal(ok.expand(B, Hm, *ok.shape[2:]), want.expand(B, Hm, *ok.shape[2:])):
            return False, None
    return True, (None if bool(real.all()) else real)


def _band_rows(r0: int, C: int, q_len: int, k_len: int, causal: bool, window: int | None, device) -> torch.Tensor:
    """Bool ``[C, K]`` causal/window band of query rows ``r0 .. r0+C-1`` (bool triangles: no int index matrices)."""
    p0 = k_len - q_len + r0  # absolute position of the first row
    band = torch.ones(C, k_len, dtype=torch.bool, device=device)
    if causal:
        band = band.tril(diagonal=p0)  # j <= p0 + c
    if window is not None:
        band = band.triu(diagonal=p0 - window + 1)  # p0 + c - j < window
    return band


# --------------------------------------------------------------------------------------------------------
# the mask every kernel reads
# --------------------------------------------------------------------------------------------------------
@dataclass
class KeyMask:
    """Which keys each of the ``q_len`` query rows may attend, structured or explicit (see the module docstring).

    Build it with :meth:`build`; kernels read it with :meth:`block` (the allowed pairs, and any additive bias, of a
    chunk of query rows over the keys they can possibly see) and interventions with :meth:`visible_counts`.
    """

    q_len: int
    k_len: int
    causal: bool = True
    key_padding: torch.Tensor | None = None  # [B|1, K] True = real key (structured form)
    window: int | None = None  # sliding window (structured form)
    num_sinks: int = 0  # first real keys always visible inside a window (structured form)
    explicit: torch.Tensor | None = None  # [B|1, H|1, Q|1, K] bool or additive float: the model's mask as given

    @classmethod
    def build(cls, q_len: int, k_len: int, *, mask=None, causal: bool = True, key_padding=None,
              window: int | None = None, num_sinks: int = 0, recognise_structure: bool = True) -> "KeyMask":
        """From the model's ``mask`` (None, bool or additive float) or from structured arguments.

        With a ``mask`` the mask alone decides what is allowed; ``causal`` and ``window`` are then only hints that
        let a standard mask be recognised (``recognise_structure``) and take the fast structured paths.
        """
        if isinstance(mask, KeyMask):
            return mask
        if mask is None:
            sinks = num_sinks if window is not None else 0
            return cls(q_len, k_len, causal=bool(causal), key_padding=key_padding, window=window, num_sinks=sinks)
        if key_padding is not None or num_sinks:
            raise ValueError("pass either the model's attention mask or key_padding / num_sinks, not both")
        mask = _as_4d(mask, q_len, k_len)
        if recognise_structure:
            ok, padding = recognise(mask, q_len, k_len, causal=causal, window=window)
            if ok:
                return cls(q_len, k_len, causal=bool(causal), key_padding=padding, window=window)
        return cls(q_len, k_len, causal=bool(causal), explicit=mask)

    @property
    def structured(self) -> bool:
        return self.explicit is None

    @property
    def is_plain_causal(self) -> bool:
        """Structured with no padding, window or sinks: exactly what SDPA's ``is_causal`` (or nothing) computes."""
        return self.structured and self.key_padding is None and self.window is None

    def sinks(self, device) -> torch.Tensor | None:
        """``[B|1, K]`` bool always-visible sink keys of the structured form (None when there are none)."""
        return sink_flags(self.key_padding, self.num_sinks, self.k_len, device) if self.window is not None else None

    def block(self, rows, device, restrict: bool = True):
        """Allowed pairs of some query rows: ``(kidx [Kr], ok [B|1, H|1, C, Kr] bool, bias [..] fp32 | None)``.

        ``rows`` is a slice or a LongTensor of query indices (0..Q-1). With ``restrict`` only keys some of these rows
        may attend are returned (the causal prefix, the window band, the explicit mask's non-empty columns), so the
        score block is ``C × Kr``; ``kidx`` is never empty (an all-masked block keeps key 0, disallowed).
        """
        Q, K = self.q_len, self.k_len
        idx = torch.arange(Q, device=device)[rows] if isinstance(rows, slice) else rows.to(device)  # [C]
        qpos = K - Q + idx  # [C] absolute positions
        if self.structured and Q > K and (self.causal or self.window is not None):
            raise ValueError(f"more queries ({Q}) than keys ({K}): with a causal or windowed mask the queries must "
                             "be the last Q of the K positions")
        if self.structured:
            sinks = self.sinks(device)
            if restrict and idx.numel():
                kidx = key_index(int(qpos.min()), int(qpos.max()) + 1, K, causal=self.causal, window=self.window,
                                 sinks=sinks, device=device)
            else:
                kidx = torch.arange(K, device=device)
            ok = band_allowed(qpos, kidx, causal=self.causal, key_padding=self.key_padding, sinks=sinks,
                              window=self.window)  # [B|1, 1, C, Kr]
            return kidx, ok, None
        ok, bias = _explicit_block(self.explicit, rows if isinstance(rows, slice) else idx)  # [B|1, H|1, C|1, K]
        ok = ok.expand(*ok.shape[:2], idx.numel(), K)
        bias = None if bias is None else bias.expand(*bias.shape[:2], idx.numel(), K)
        if restrict:
            cols = ok.any(dim=2).any(dim=1).any(dim=0)  # [K]
            if not bool(cols.all()):
                kidx = cols.nonzero().flatten()
                if kidx.numel() == 0:
                    kidx = torch.zeros(1, dtype=torch.long, device=device)
                ok = ok.index_select(-1, kidx)
                bias = None if bias is None else bias.index_select(-1, kidx)
                return kidx, ok, bias
        return torch.arange(K, device=device), ok, bias

    def visible_counts(self, device=None) -> torch.Tensor:
        """``[B|1, H|1, Q]`` fp32: how many keys each query row may attend (padding, causality, windows, blocks).

        Example:
            >>> KeyMask.build(3, 5).visible_counts().tolist()        # plain causal, 2 cached keys
            [[[3.0, 4.0, 5.0]]]
        """
        device = device or (self.explicit.device if self.explicit is not None else
                            self.key_padding.device if self.key_padding is not None else "cpu")
        Q, K = self.q_len, self.k_len
        if self.is_plain_causal:
            qpos = torch.arange(K - Q, K, device=device, dtype=torch.float32)  # [Q]
            counts = qpos + 1 if self.causal else torch.full((Q,), float(K), device=device)
            return counts.view(1, 1, Q)
        parts = []
        for rows in _chunks(Q, K, 1 if self.key_padding is None else self.key_padding.shape[0]):
            _, ok, _ = self.block(rows, device, restrict=False)  # [B|1, H|1, C, K]
            parts.append(ok.sum(-1, dtype=torch.float32))
        shape = torch.broadcast_shapes(*[p.shape[:2] for p in parts])
        return torch.cat([p.expand(*shape, p.shape[-1]) for p in parts], dim=-1)


def attach_mask(make_ctx, keys: KeyMask):
    """Wrap a backend's ``make_ctx(entry[, rows])`` so every context it makes carries ``keys`` as ``ctx.mask``
    (duck typing: kernels never import the intervention classes)."""
    if make_ctx is None:
        return None

    def make(entry, *args, **kwargs):
        ctx = make_ctx(entry, *args, **kwargs)
        if ctx is not None:
            try:
                ctx.mask = keys
            except AttributeError:  # a frozen or slotted stand-in context: nothing to attach
                pass
        return ctx

    return make
