"""The ``override_mask`` stage: interventions that replace the model's attention mask inside blocks of
(query span × key span) run here, **before** the backend, so every backend supports them.

:func:`apply_mask_overrides` is called by :func:`attnkit.hooks.runtime.attend` for a site whose plan has
``override_mask`` entries. Rules (also in the hook table of :mod:`attnkit.interventions.base`):

* each entry returns a list of :class:`~attnkit.interventions.base.MaskBlock` (or None: no change); blocks apply in
  recipe order, each replacing what came before inside ``queries × keys`` (``allow=True`` shows, ``False`` hides);
* padding keys (``ctx.key_mask("real")`` False) are never made visible;
* an entry that targets some heads only changes those heads' mask (the result is then per head ``[B, H, Q, K]``);
* the result is an explicit bool mask ``[B, 1|H, Q, K]`` (True = attend) — the size of the mask transformers builds
  for any padded batch; a float (additive) model mask keeps its values outside the blocks. With no block the
  model's mask is returned untouched, so a call the hook leaves alone runs exactly as before.

Example (queries 1-2 and key 3 form two segments; the blocks make them see each other in a causal call):
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from attnkit.interventions.base import MaskBlock
    >>> from attnkit.kernels.plan import PlanEntry
    >>> class Both:
    ...     def capabilities(self): return {"override_mask"}
    ...     def override_mask(self, ctx):
    ...         a = torch.tensor([[False, True, True, False]]); b = torch.tensor([[False, False, False, True]])
    ...         return [MaskBlock(a, b), MaskBlock(b, a)]
    >>> ctx = SimpleNamespace(tracker=None, spans={})
    >>> mask = apply_mask_overrides([PlanEntry(Both(), torch.ones(2, dtype=torch.bool))], None, q_len=4, k_len=4,
    ...                             causal=True, make_ctx=lambda entry, rows=None: ctx, device="cpu")
    >>> mask[0, 0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
"""

from __future__ import annotations

import torch

from attnkit.kernels.masks import allowed_mask
from attnkit.kernels.plan import entry_caps


def mask_entries(entries) -> list:
    """The plan entries of a site that override the mask."""
    return [e for e in entries if "override_mask" in entry_caps(e)]


def _real_keys(ctx, k_len: int, device) -> torch.Tensor | None:
    """``[B, K]`` bool real keys of the call (None: unknown, every key counts as real)."""
    try:
        real = ctx.key_mask("real") if getattr(ctx, "tracker", None) is not None or "real" in ctx.spans else None
    except (KeyError, AttributeError):
        return None
    return None if real is None else real.to(device)[:, :k_len]


def _check_block(name: str, block, batch: int, q_len: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    queries, keys = torch.as_tensor(block.queries), torch.as_tensor(block.keys)
    if queries.dim() != 2 or queries.shape[1] != q_len or queries.shape[0] not in (1, batch):
        raise ValueError(f"{name}: override_mask block queries must be bool [B={batch}, Q={q_len}], got "
                         f"{tuple(queries.shape)}")
    if keys.dim() != 2 or keys.shape[1] != k_len or keys.shape[0] not in (1, batch):
        raise ValueError(f"{name}: override_mask block keys must be bool [B={batch}, K={k_len}], got "
                         f"{tuple(keys.shape)}")
    return queries.bool(), keys.bool()


def apply_mask_overrides(entries, mask, *, q_len: int, k_len: int, causal: bool, make_ctx, device):
    """The call's mask after every ``override_mask`` entry of ``entries`` (see the module docstring) → the model's
    ``mask`` unchanged (no block) or an explicit mask ``[B|1, 1|H, Q, K]`` (bool, or the float model mask's dtype)."""
    todo = mask_entries(entries)
    if not todo:
        return mask
    allowed = None  # [B|1, 1|H, Q, K] bool, built on the first block
    for entry in todo:
        iv = entry.intervention
        name = getattr(iv, "name", type(iv).__name__)
        ctx = make_ctx(entry)
        blocks = iv.override_mask(ctx) or []
        if not blocks:
            continue
        batch = getattr(ctx, "batch", None) or max(torch.as_tensor(b.queries).shape[0] for b in blocks)
        if allowed is None:
            base = allowed_mask(mask, q_len, k_len, causal, device)  # [B|1, 1, Q, K] bool or None
            allowed = (torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device) if base is None
                       else base.to(device))
            allowed = allowed.expand(max(batch, allowed.shape[0]), *allowed.shape[1:]).clone()
        real = _real_keys(ctx, k_len, device)  # [B, K] or None
        heads = entry.heads_on(device)  # [H] bool
        if not bool(heads.all()) and allowed.shape[1] == 1:
            allowed = allowed.expand(-1, heads.shape[0], -1, -1).clone()  # per-head mask from here on
        for block in blocks:
            queries, keys = _check_block(name, block, allowed.shape[0], q_len, k_len)
            queries, keys = queries.to(device), keys.to(device)
            if block.allow and real is not None:
                keys = keys & real
            inside = queries[:, None, :, None] & keys[:, None, None, :]  # [B, 1, Q, K]
            if allowed.shape[1] > 1:
                inside = inside & heads.view(1, -1, 1, 1)
            allowed = torch.where(inside, torch.tensor(bool(block.allow), device=device), allowed)
    if allowed is None:
        return mask
    if mask is not None and mask.dtype != torch.bool and mask.is_floating_point():
        floor = torch.finfo(mask.dtype).min
        kept = allowed & (mask > floor / 2)  # still allowed by the model: keep its additive value
        return torch.where(kept, mask, torch.where(allowed, torch.zeros((), dtype=mask.dtype, device=device),
                                                   torch.tensor(floor, dtype=mask.dtype, device=device)))
    return allowed
