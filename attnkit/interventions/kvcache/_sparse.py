"""What the decode-time sparse methods share: the keys a call may see, RoPE positions, attention over a chosen key
set (optionally at re-indexed positions), and the account of the keys each step attends.

Shared simulation rule (METHODS-2.md §8): a method chooses, per step, per layer and per head, a set of keys; the
simulation gives exactly the attention output over that set — a ``−∞`` pre-softmax mask when the keys keep their
positions (:func:`keep_bias`), or the attention recomputed over the gathered keys when the method places them at
compacted positions (:func:`gathered_attention` with :class:`~attnkit.rope.Rotary` shifts). Nothing is evicted: the
cache stays full and timings measure the simulation, not the method's kernels.

Example (the account of one decode step: head 0 attends 2 of 4 visible keys, head 1 all 4):
    >>> import torch
    >>> acc = KeyAccount()
    >>> keep = torch.tensor([[[[1, 0, 1, 0]], [[1, 1, 1, 1]]]], dtype=torch.bool)      # [B, H, Q, K]
    >>> acc.add(3, keep, torch.ones(1, 1, 1, 4, dtype=torch.bool))
    >>> acc.fraction(), acc.summary()["per_layer"]
    (0.75, {3: 0.75})
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


# ---- what a call may see -------------------------------------------------------------------------------------------
def visible(ctx) -> torch.Tensor:
    """Bool ``[B, 1|H, Q, K]``: the keys each query row may attend under the model's own mask (padding, causality,
    sliding windows), read from the backend's ``ctx.mask``."""
    _, ok, _ = ctx.mask.block(slice(0, ctx.q_len), ctx.device, restrict=False)  # [B|1, H|1, Q, K]
    return ok.expand(ctx.batch, *ok.shape[1:])


def real_keys(ctx) -> torch.Tensor:
    """Bool ``[B, K]``: real (not padding) keys of the call (all real when nothing is tracked)."""
    if ctx.tracker is None:
        return torch.ones(ctx.batch, ctx.k_len, dtype=torch.bool, device=ctx.device)
    return ctx.key_mask("real").to(ctx.device)


def rope_positions(real: torch.Tensor) -> torch.Tensor:
    """Long ``[B, K]`` RoPE positions of the cache slots as ``generate`` numbers them (``cumsum − 1`` over real
    tokens; padding at 0).

    Example:
        >>> rope_positions(torch.tensor([[False, True, True], [True, True, True]])).tolist()
        [[0, 0, 1], [0, 1, 2]]
    """
    return (real.long().cumsum(-1) - 1).clamp_min(0)


def key_rope_positions(ctx) -> torch.Tensor:
    """Long ``[B, K]`` RoPE positions of this call's keys, counted over the whole tracked sequence (right for caches
    that hold a window of it, e.g. Gemma-3's sliding layers); slot indices when nothing is tracked."""
    if ctx.tracker is None:
        return torch.arange(ctx.k_len, device=ctx.device)[None].expand(ctx.batch, -1)
    return ctx.keys_of(rope_positions(ctx.tracker.mask("real"))).to(ctx.device)


def key_indices(ctx) -> torch.Tensor:
    """Long ``[B, K]``: the tracked-sequence index of each of this call's keys (slots when nothing is tracked)."""
    if ctx.tracker is None:
        return torch.arange(ctx.k_len, device=ctx.device)[None].expand(ctx.batch, -1)
    everything = torch.arange(ctx.tracker.length)[None].expand(ctx.batch, -1)
    return ctx.keys_of(everything).to(ctx.device)


def full_attention_layers(model, layers, owner: str) -> list[int]:
    """The targeted text layers that attend globally (Gemma-3's sliding-window layers already bound their cache and
    are left alone); ValueError when none is left."""
    from attnkit.targets import parse_layers

    layer_types = getattr(model.text_config, "layer_types", None) or []
    n_layers = model.component("text").num_layers
    full = [i for i in parse_layers(layers, n_layers) if not layer_types or layer_types[i] != "sliding_attention"]
    if not full:
        raise ValueError(f"{owner}: every targeted layer uses a sliding window, which the method does not support")
    return full


class FullLayersWithRotary:
    """Mixin for the methods that re-rotate keys to new positions (LongHeads, TokenSelect): targets only the
    full-attention layers (:func:`full_attention_layers`) and keeps each layer's rotation (:func:`attnkit.rope
    .rotary_for`) for the attachment."""

    def setup(self, model) -> None:
        from attnkit.targets import Target

        self.target = Target(layers=full_attention_layers(model, self.target.layers, self.name),
                             modules=self.target.modules)

    def install(self, handle) -> list:
        from attnkit.rope import rotary_for

        self._model = handle.model
        self._rotary = {layer: rotary_for(handle.model, layer, self.name) for layer in self.target.layers}
        return []

    def _rot(self, layer: int):
        """The rotation of ``layer`` (:class:`attnkit.rope.Rotary`), built on first use for untargeted layers."""
        from attnkit.rope import rotary_for

        if layer not in self._rotary:
            self._rotary[layer] = rotary_for(self._model, layer, self.name)
        return self._rotary[layer]


def expand_kv(x: torch.Tensor, num_heads: int, gqa_map: str = "group") -> torch.Tensor:
    """``[B, Hkv, K, D]`` → ``[B, H, K, D]``: query head ``h`` reads KV head ``h // g`` (HF layout, ``"group"``) or
    ``h % Hkv`` (``"modulo"``, TokenSelect's kernel)."""
    hkv = x.shape[1]
    if hkv == num_heads:
        return x
    if gqa_map == "modulo":
        return x[:, torch.arange(num_heads, device=x.device) % hkv]
    return x.repeat_interleave(num_heads // hkv, dim=1)


def scaling_of(ctx) -> float:
    """The attention module's score scale (``module.scaling``; ``1/√d`` when it has none)."""
    scale = getattr(ctx.module, "scaling", None)
    return float(scale) if scale is not None else ctx.query.shape[-1] ** -0.5


def softcap_of(ctx) -> float | None:
    config = getattr(ctx.module, "config", None)
    return getattr(config, "attn_logit_softcapping", None)


def raw_scores(ctx, rows: slice | None = None, scaled: bool = True) -> torch.Tensor:
    """fp32 ``q·kᵀ`` ``[B, H, R, K]`` of this call (post-RoPE, ``× scaling`` when ``scaled``), rows ``rows``."""
    q = ctx.query if rows is None else ctx.query[:, :, rows]  # [B, H, R, D]
    k = expand_kv(ctx.key, q.shape[1])  # [B, H, K, D]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))  # [B, H, R, K]
    return scores * scaling_of(ctx) if scaled else scores


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed keys (fp32); rows with none give 0. scores ``[..., K]``, allowed broadcastable."""
    return torch.softmax(scores.float().masked_fill(~allowed, NEG_INF), dim=-1).nan_to_num(0.0)


def keep_bias(keep: torch.Tensor) -> torch.Tensor:
    """A pre-softmax bias from a keep mask: 0 where kept, ``−∞`` elsewhere (same shape, fp32)."""
    return torch.zeros(keep.shape, device=keep.device).masked_fill(~keep, NEG_INF)


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, *,
                       scaling: float, softcap: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of rows ``q [B, H, R, D]`` over their own keys ``k/v [B, H|1, S, D]`` (already gathered and placed
    at the positions the method wants) under ``allowed [B, H|1, R, S]`` (plus an optional additive logit ``bias``
    broadcastable to ``[B, H, R, S]``) → ``[B, H, R, D]`` in q's dtype (fp32 math; rows with no allowed key give 0).

    Example (METHODS-2.md §1.3, vendor weighting: the mean key [.5, .5] and the kept key [0, 0]):
        >>> q = torch.tensor([1.0, 1.0]).view(1, 1, 1, 2)
        >>> k = torch.tensor([[0.5, 0.5], [0.0, 0.0]]).view(1, 1, 2, 2)
        >>> v = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
        >>> out = gathered_attention(q, k, v, torch.ones(1, 1, 1, 2, dtype=torch.bool), scaling=1.0)
        >>> [round(x, 6) for x in out.flatten().tolist()]
        [0.731059, 0.731059]
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # [B, H, R, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.float()
    probs = masked_softmax(scores, allowed)  # [B, H, R, S]
    return torch.matmul(probs, v.float()).to(q.dtype)  # [B, H, R, D]


# ---- the account ---------------------------------------------------------------------------------------------------
class KeyAccount:
    """Keys attended vs keys visible, summed over the query rows of every restricted call (decode steps), per layer
    and over the method's target heads: ``fraction()`` = attended / visible (1.0 = dense attention)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.attended: dict[int, float] = {}
        self.visible: dict[int, float] = {}
        self.rows: dict[int, int] = {}
        self.calls: dict[int, int] = {}

    def add(self, layer: int, keep: torch.Tensor | None, allowed: torch.Tensor, heads: torch.Tensor | None = None,
            rows: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> None:
        """Record one call: ``keep`` bool ``[B, H|1, Q, K]`` (None = every visible key), ``allowed`` the model's
        visible keys ``[B, 1|H, Q, K]``; ``heads`` ``[H]`` bool (the target heads), ``rows`` ``[B, Q]`` bool (the real
        query rows); ``extra`` ``[B]`` or ``[B, H]``: keys outside the cache each row also attends (a compensation
        token)."""
        seen = allowed if keep is None else (keep & allowed)  # [B, H|1, Q, K]
        H = max(seen.shape[1], allowed.shape[1], 1 if heads is None else heads.shape[0])
        seen, allowed = seen.expand(-1, H, -1, -1), allowed.expand(seen.shape[0], H, -1, -1)
        weight = torch.ones(seen.shape[:3], device=seen.device)  # [B, H, Q]
        if heads is not None:
            weight = weight * heads.to(seen.device).view(1, -1, 1).float()
        if rows is not None:
            weight = weight * rows.to(seen.device)[:, None, :].float()
        attended = seen.sum(-1).float()  # [B, H, Q]
        if extra is not None:  # [B] or [B, H]
            extra = extra.to(seen.device).float()
            attended = attended + (extra.view(-1, 1, 1) if extra.dim() == 1 else extra[:, :, None])
        self.attended[layer] = self.attended.get(layer, 0.0) + float((attended * weight).sum())
        self.visible[layer] = self.visible.get(layer, 0.0) + float((allowed.sum(-1) * weight).sum())
        self.rows[layer] = self.rows.get(layer, 0) + int(weight.sum())
        self.calls[layer] = self.calls.get(layer, 0) + 1

    def fraction(self, layer: int | None = None) -> float:
        """Attended / visible keys (over every recorded layer, or one); 1.0 when nothing was recorded."""
        layers = [layer] if layer is not None else list(self.visible)
        vis = sum(self.visible.get(i, 0.0) for i in layers)
        return 1.0 if vis == 0 else sum(self.attended.get(i, 0.0) for i in layers) / vis

    def summary(self) -> dict:
        """``{"fraction", "per_layer": {layer: fraction}, "steps": decode calls seen by the first layer,
        "mean_keys": mean attended keys per (row, head)}``."""
        rows = sum(self.rows.values())
        return {"fraction": self.fraction(), "per_layer": {i: self.fraction(i) for i in sorted(self.visible)},
                "steps": self.calls.get(min(self.calls), 0) if self.calls else 0,
                "mean_keys": (sum(self.attended.values()) / rows) if rows else 0.0}


def check_int(owner: str, name: str, value, low: int = 0) -> int:
    """``value`` as an int ≥ ``low``; ValueError with one sentence otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an int ≥ {low}, got {value!r}")
    return value
