"""Recycled Attention / RefreshKV (Xu, Goyal, Choi; arXiv 2411.05787, ACL 2025 as "RefreshKV"), METHODS-2.md §8a:
decode steps alternate between full attention and attention over a small recycled cache, simulated exactly.

No code could be obtained; the rule is the ACL paper's text. State per layer (per sample):

* a partial cache ``C_p`` of ``budget`` slots per **KV head**, ordered by ascending score at the last full step;
* ``q̄`` — the query of the last full step, averaged over the layer's query heads.

1. **After prefill** (a full step): the last prompt token's attention over every key, per query head, max-pooled
   along the keys (kernel ``kernel``, default 7, stride 1, as SnapKV with observation window 1), then the **max over
   the query heads of a KV group**; the top ``budget`` keys per KV head, stored in ascending score order.
2. **Scheduling.** At every ``stride``-th decode step (``S``, default 5) a layer does a full step if
   ``cos(mean_h q_t, q̄) < similarity`` (default 0.85, the paper's Llama-3.1 value; 0.95 for Qwen2);
   ``schedule="fixed"`` (the paper's ablation) makes every ``stride``-th step full for every layer. Other steps are
   partial.
3. **Partial step:** attend over ``C_p ∪ {current token}``; then append the current token to ``C_p`` and evict its
   first (lowest-score) entry.
4. **Full step:** attend over everything; rebuild ``C_p`` from this step's attention as in 1; store ``q̄``.

Sliding-window layers (Gemma-3's local layers, whose cache is already bounded) are left alone. ``budget`` is an int or
a fraction of the prompt length (default ``1/8``, the paper's ``K = L/8``). Keys keep their
positions, so the ``−∞`` mask (``score_bias``) is exact. Per sample: with a batch, each sample keeps its own cache
and schedule (left padding never enters ``C_p``). A decode call with several new tokens (a chunk on a cache) is
treated as a full step. :attr:`Recycled.account` counts the keys each decode step attends; :attr:`full_steps`
counts the (layer, sample) full steps taken.

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> rec = Recycled(budget=3, stride=5)
    >>> with attnkit.attach(model, [rec]):
    ...     _ = model.generate(torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17]]), max_new_tokens=3, do_sample=False)
    >>> round(rec.account.fraction(), 4)          # steps 1, 2: 4 of 9 keys, then 4 of 10 keys
    0.4211
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.kvcache._sparse import KeyAccount, full_attention_layers, keep_bias, masked_softmax, \
    raw_scores, real_keys, visible
from attnkit.targets import Target

SCHEDULES = ("similarity", "fixed")


def pooled_group_scores(attn: torch.Tensor, group: int, kernel: int) -> torch.Tensor:
    """``[B, H, K]`` attention of one query row → ``[B, Hkv, K]``: max-pool along keys (odd ``kernel``, stride 1,
    same length) then max over each KV group's ``group`` query heads."""
    if kernel > 1:
        B, H, K = attn.shape
        attn = torch.nn.functional.max_pool1d(attn.reshape(B * H, 1, K), kernel, stride=1,
                                              padding=kernel // 2).reshape(B, H, K)
    B, H, K = attn.shape
    return attn.view(B, H // group, group, K).amax(dim=2)  # [B, Hkv, K]


def recycled_cache(scores: torch.Tensor, real: torch.Tensor, budget: int) -> torch.Tensor:
    """The partial cache: per KV head the ``budget`` best real keys, in **ascending** score order → long
    ``[B, Hkv, budget]`` slot indices (fewer real keys: every real key). scores ``[B, Hkv, K]``, real ``[B, K]``.

    Example (METHODS-2.md §8a worked example: pooled scores of one KV group, budget 3):
        >>> s = torch.tensor([.40, .30, .05, .20, .25, .10, .05, .15]).view(1, 1, 8)
        >>> recycled_cache(s, torch.ones(1, 8, dtype=torch.bool), 3).tolist()
        [[[4, 1, 0]]]
    """
    n = min(int(budget), scores.shape[-1])
    s = scores.float().masked_fill(~real[:, None, :], float("-inf"))  # pads last
    top = s.topk(n, dim=-1)  # descending
    return top.indices.flip(-1)  # [B, Hkv, n] ascending score


def recycle_step(cache: torch.Tensor, slot: int) -> torch.Tensor:
    """After a partial step: append ``slot`` and evict the first (lowest-score) entry. ``[B, Hkv, n]`` → same.

    Example (worked example: [4, 1, 0] → token 8 → token 9):
        >>> recycle_step(recycle_step(torch.tensor([[[4, 1, 0]]]), 8), 9).tolist()
        [[[0, 8, 9]]]
    """
    new = torch.full((*cache.shape[:2], 1), int(slot), dtype=cache.dtype, device=cache.device)
    return torch.cat([cache[..., 1:], new], dim=-1)


def query_similarity(q_now: torch.Tensor, q_full: torch.Tensor) -> torch.Tensor:
    """``cos(q_now, q_full)`` per sample; both ``[B, D]`` (means over the query heads).

    Example (worked example):
        >>> round(float(query_similarity(torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.2, 0.8]]))), 5)
        0.98198
    """
    return torch.nn.functional.cosine_similarity(q_now.float(), q_full.float(), dim=-1)


@register_intervention
class Recycled(Intervention):
    name = "recycled-attention"
    description = "Recycled Attention / RefreshKV: decode over a small recycled cache, refreshed by full steps"
    requires = frozenset({"text_decoder"})
    conformance = {
        "neutral": {"budget": 100_000}, "active": {"budget": 2},
        "not_applicable": {"generate": "a decode-time method: a recomputed prefill attends fully, decode steps do not"}}

    def __init__(self, budget: int | float = 0.125, stride: int = 5, similarity: float = 0.85, kernel: int = 7,
                 schedule: str = "similarity", **target):
        if target.get("heads") is not None:
            raise ValueError("recycled-attention: the cache is per KV head and covers every head; do not pass heads")
        if schedule not in SCHEDULES:
            raise ValueError(f"recycled-attention: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0 or \
                (isinstance(budget, float) and budget > 1):
            raise ValueError(f"recycled-attention: budget must be an int ≥ 1 (slots) or a fraction in (0, 1] of the "
                             f"prompt length, got {budget!r}")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"recycled-attention: kernel must be an odd int ≥ 1, got {kernel!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"recycled-attention: stride must be an int ≥ 1, got {stride!r}")
        super().__init__(**target)
        self.budget, self.stride, self.similarity, self.kernel, self.schedule = budget, stride, similarity, kernel, \
            schedule
        self.account = KeyAccount()
        self.full_steps = 0

    def setup(self, model) -> None:
        self._group = model.component("text").kv_group
        self.target = Target(layers=full_attention_layers(model, self.target.layers, self.name),
                             modules=self.target.modules)

    # ---- full steps -------------------------------------------------------------------------------------------------
    def _budget(self, prompt_len: torch.Tensor) -> torch.Tensor:
        if isinstance(self.budget, float):
            return (prompt_len.float() * self.budget).round().clamp_min(1).long()  # [B]
        return torch.full_like(prompt_len, int(self.budget))

    def _rebuild(self, ctx, row: int, state: dict, which: torch.Tensor) -> None:
        """Rebuild ``C_p`` and ``q̄`` of the samples ``which [B]`` from query row ``row`` of this call."""
        allowed = visible(ctx)[:, :, row]  # [B, 1, K]
        attn = masked_softmax(raw_scores(ctx, slice(row, row + 1))[:, :, 0], allowed)  # [B, H, K]
        pooled = pooled_group_scores(attn, self._group, self.kernel)  # [B, Hkv, K]
        real = allowed[:, 0]  # [B, K]: visible real keys of this row
        n = int(state["budget"].max())
        cache = recycled_cache(pooled, real, n)  # [B, Hkv, n']
        if cache.shape[-1] < n:  # fewer keys than the budget (short prompt): repeat the lowest entry
            cache = torch.cat([cache[..., :1].expand(-1, -1, n - cache.shape[-1]), cache], -1)
        qbar = ctx.query[:, :, row].float().mean(1)  # [B, D]
        if "cache" not in state:
            state["cache"], state["qbar"] = cache, qbar
        else:
            keep = which.view(-1, 1, 1)
            state["cache"] = torch.where(keep, cache, state["cache"])
            state["qbar"] = torch.where(which.view(-1, 1), qbar, state["qbar"])

    # ---- the hook ---------------------------------------------------------------------------------------------------
    def score_bias(self, ctx):
        state = ctx.state
        everyone = torch.ones(ctx.batch, dtype=torch.bool, device=ctx.device)
        if ctx.is_prefill or "cache" not in state or ctx.q_len > 1:
            if ctx.is_prefill or "cache" not in state:
                state["budget"] = self._budget(real_keys(ctx).sum(-1))  # [B] slots per sample
                state["t"] = 0
            self._rebuild(ctx, ctx.q_len - 1, state, everyone)
            if not ctx.is_prefill:
                self.account.add(ctx.layer, None, visible(ctx), ctx.heads)
            return None
        state["t"] += 1
        allowed = visible(ctx)  # [B, 1, 1, K]
        if state["t"] % self.stride == 0:
            if self.schedule == "fixed":
                full = everyone
            else:
                full = query_similarity(ctx.query[:, :, 0].float().mean(1), state["qbar"]) < self.similarity  # [B]
        else:
            full = torch.zeros_like(everyone)
        slot = ctx.k_len - 1  # the current token
        cache = state["cache"]  # [B, Hkv, n] (per-sample budgets: the first entries beyond a budget are unused)
        keep_kv = torch.zeros(ctx.batch, cache.shape[1], ctx.k_len, dtype=torch.bool, device=ctx.device)
        n = cache.shape[-1]
        used = torch.arange(n, device=ctx.device)[None, :] >= (n - state["budget"].view(-1, 1))  # [B, n]
        keep_kv.scatter_(-1, cache, used[:, None, :].expand_as(cache))
        keep_kv[..., slot] = True
        keep = keep_kv.repeat_interleave(self._group, dim=1)[:, :, None, :]  # [B, H, 1, K]
        keep = keep | full.view(-1, 1, 1, 1)
        self.account.add(ctx.layer, keep, allowed, ctx.heads)
        if bool(full.any()):
            self.full_steps += int(full.sum())
            self._rebuild(ctx, 0, state, full)
        state["cache"] = torch.where(full.view(-1, 1, 1), state["cache"], recycle_step(cache, slot))
        return keep_bias(keep)
