"""Rotary position embeddings seen from inside an attention call: move post-RoPE queries and keys to other positions.

transformers hands attention functions queries and keys that are already rotated (``x_p = R(p)·x``, half-split
layout: dims ``i`` and ``i + r/2`` rotate together by ``p·inv_freq[i]``, the first ``r`` dims, ``r = 2·len(inv_freq)``;
partial rotary keeps the rest). Rotations compose (``R(a)R(b) = R(a+b)``), so a vector can be moved from position
``p`` to ``p'`` by :meth:`Rotary.shift` with ``delta = p' − p`` — exactly, without the pre-RoPE tensors, and whatever
constant cos/sin scaling the model applies (YaRN's ``attention_scaling`` is a factor, untouched by a rotation).
``shift(x, -p)`` un-rotates (the "raw" vector that position-free scores such as PINE's importance or LongHeads'
chunk scores use).

This is what per-query RoPE re-indexing needs (PINE's per-segment positions, LongHeads'/TokenSelect's compacted
positions): :func:`rotary_for` finds the rotation of one layer (Gemma-3's local and global layers differ). Refused
with one sentence: multi-axis RoPE (Qwen2-VL's mrope), length-dependent RoPE (dynamic, longrope), models without
RoPE.

Example:
    >>> import torch
    >>> rot = Rotary(inv_freq=1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))
    >>> x = torch.randn(1, 1, 3, 8)
    >>> at5 = rot.shift(x, torch.tensor([5.0, 5.0, 5.0]))          # x at position 5
    >>> back = rot.shift(at5, torch.tensor([-5.0, -5.0, -5.0]))
    >>> torch.allclose(back, x, atol=1e-5)
    True
    >>> q, k = rot.shift(x[:, :, :1], torch.tensor([7.0])), rot.shift(x[:, :, 1:2], torch.tensor([3.0]))
    >>> q2, k2 = rot.shift(x[:, :, :1], torch.tensor([14.0])), rot.shift(x[:, :, 1:2], torch.tensor([10.0]))
    >>> torch.allclose((q * k).sum(), (q2 * k2).sum(), atol=1e-4)      # scores depend on p_q - p_k only
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNSUPPORTED_ROPE = ("dynamic", "longrope", "mrope")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., r]`` → ``[-x2, x1]`` (HF's half-split layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Rotary:
    """The rotation of one layer: ``inv_freq [r/2]`` (fp32, CPU) on the first ``r`` dims of each head."""

    inv_freq: torch.Tensor  # [r/2]

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def shift(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Move ``x [..., N, D]`` (rotated at some positions) by ``delta`` positions, broadcastable to ``[..., N]``
        (fp32 math, returned in ``x``'s dtype). ``delta`` 0 returns ``x``'s values exactly."""
        r = self.rotary_dim
        angles = delta.to(x.device, torch.float32)[..., None] * self.inv_freq.to(x.device)  # [..., N, r/2]
        emb = torch.cat((angles, angles), dim=-1)  # [..., N, r]
        x_rot = x[..., :r].float()
        moved = x_rot * emb.cos() + rotate_half(x_rot) * emb.sin()  # [..., N, r]
        return torch.cat((moved.to(x.dtype), x[..., r:]), dim=-1)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The position-free vectors ``R(−p)·x`` of ``x [..., N, D]`` rotated at ``positions [..., N]``."""
        return self.shift(x, -positions.to(torch.float32))


def _rope_kind(config) -> set:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kinds: set = set()
    if isinstance(rope, dict):
        parts = [rope] + [v for v in rope.values() if isinstance(v, dict)]  # per layer type (Gemma-3)
        for part in parts:
            kinds |= {part.get("rope_type"), part.get("type")}
            if "mrope_section" in part:
                kinds.add("mrope")
    return kinds - {None}


def rotary_embedding_of(model) -> torch.nn.Module | None:
    """The text decoder's rotary-embedding module (the first ``*RotaryEmbedding`` holding ``inv_freq`` buffers)."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and any("inv_freq" in n for n, _ in
                                                                      module.named_buffers(recurse=False)):
            return module
    return None


def rotary_for(model, layer: int, owner: str = "this method") -> Rotary:
    """The :class:`Rotary` of text layer ``layer`` of ``model``; ValueError (one sentence) when it cannot be known.

    Example:
        >>> from attnkit.testing import tiny_causal_lm
        >>> rotary_for(tiny_causal_lm("llama"), 0).rotary_dim        # head_dim 16
        16
    """
    config = model.config.get_text_config(decoder=True)
    bad = _rope_kind(config) & set(UNSUPPORTED_ROPE)
    if bad:
        raise ValueError(f"{owner} re-indexes RoPE positions, which rope type {sorted(bad)[0]!r} does not allow "
                         "(positions along several axes or a length-dependent rotation)")
    module = rotary_embedding_of(model)
    if module is None:
        raise ValueError(f"{owner} needs rotary position embeddings; {type(model).__name__} has none")
    layer_types = getattr(config, "layer_types", None)
    inv = None
    if layer_types and layer < len(layer_types):
        inv = getattr(module, f"{layer_types[layer]}_inv_freq", None)
    if inv is None:
        inv = getattr(module, "inv_freq", None)
    if not isinstance(inv, torch.Tensor):
        raise ValueError(f"{owner}: cannot read the rotary frequencies of layer {layer} of {type(model).__name__}")
    return Rotary(inv.detach().float().cpu())
