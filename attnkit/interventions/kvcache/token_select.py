"""TokenSelect (Wu et al., arXiv 2411.02886; repo pzs19/TokenSelect on SGLang + FlashInfer), METHODS-2.md §8d:
dynamic token-level KV selection by per-head soft voting, simulated exactly.

Rule (released code, ``patcher/token_retrieval.py``), per layer, the selection **shared by all heads**:

* the first ``n_init`` and the last ``n_local`` cached tokens are always kept; the candidates lie between; if
  ``n_init + top_k + n_local ≥ N`` (``N`` tokens cached, the current ones included) the layer attends fully;
* query fingerprint: the call's queries (un-rotated) rotated as if at positions ``n_local, n_local+1, …``, then
  averaged; keys are un-rotated (the cache stores them without RoPE);
* per head ``s_h(j) = q̄_h·k_j`` with **no** ``1/√d``; softmax over the candidates per head; **sum over heads**
  ("soft voting"); optional 1-D max-pooling of the votes (``kernel_size``, default off); the ``top_k`` best, sorted;
* attention over ``[0, n_init) ∪ top_k ∪ [N − n_local, N)``: FlashInfer rotates the gathered keys by their **index in
  the gathered list** (compacted positions, ``positions="compact"``, the default and the released behaviour) and the
  queries are the last entries of that list (causal by index);
* prefill (and any call with several new tokens) runs in chunks of ``prefill_chunk = 512`` tokens: each chunk stores
  its KV first, then selects with its own mean query, so the local window holds the chunk (``n_local`` must be at
  least ``prefill_chunk``).

``positions="original"`` keeps every key at its own position (a plain key mask) — an approximation the spec asks to
label as such. ``gqa_map="modulo"`` reproduces the released Triton scoring kernel's head map (query head ``h`` reads
KV head ``h % H_kv``; Hugging Face's layout, the default ``"group"``, is ``h // g``). The selection cache of the
paper (reuse while ``cos ≥ 0.9``) is disabled in the release and is not offered. Sliding-window layers (Gemma-3's
local layers) are left alone, as the release refuses sliding windows.

Simulation: the attention of the restricted rows is recomputed over the chosen keys at their compacted positions
(:func:`~attnkit.interventions.kvcache._sparse.gathered_attention`, ``edit_output``) — exact, ``O(rows·(n_init +
top_k + n_local))`` per layer, no ``[Q, K]`` matrix of the whole call. :attr:`TokenSelect.account` counts the keys
each decode step attends.

Defaults (configs): ``n_init=128``, ``n_local=512``, ``top_k=2048``.

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> ts = TokenSelect(n_init=1, n_local=2, top_k=2, prefill_chunk=2)
    >>> with attnkit.attach(model, [ts]):
    ...     _ = model.generate(torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17]]), max_new_tokens=2, do_sample=False)
    >>> ts.account.summary()["mean_keys"]          # 1 + 2 + 2 keys at the decode step
    5.0
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.kvcache._sparse import FullLayersWithRotary, KeyAccount, check_int, expand_kv, \
    gathered_attention, key_rope_positions, real_keys, scaling_of, softcap_of, visible

POSITIONS = ("compact", "original")
GQA_MAPS = ("group", "modulo")


def soft_votes(q_fp: torch.Tensor, k_raw: torch.Tensor, gqa_map: str = "group") -> torch.Tensor:
    """Per-head softmax of ``q̄_h·k_j`` over the candidates, summed over heads → ``[C]``.
    q_fp ``[H, D]`` (the fingerprint), k_raw ``[Hkv, C, D]`` (un-rotated candidate keys).

    Example (METHODS-2.md §8d worked example, scores h0 = [3, 2.9, 0, 0], h1 = [0, 0, 2, 0] with unit keys):
        >>> k = torch.eye(4).view(1, 4, 4).expand(2, 4, 4)
        >>> q = torch.tensor([[3.0, 2.9, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
        >>> [round(x, 4) for x in soft_votes(q, k).tolist()]
        [0.5952, 0.5477, 0.7361, 0.1211]
    """
    keys = expand_kv(k_raw[None], q_fp.shape[0], gqa_map)[0]  # [H, C, D]
    scores = torch.einsum("hd,hcd->hc", q_fp.float(), keys.float())  # [H, C], no 1/sqrt(d)
    return torch.softmax(scores, dim=-1).sum(0)  # [C]


def pick_tokens(votes: torch.Tensor, top_k: int, kernel_size: int = -1) -> torch.Tensor:
    """The ``top_k`` best candidates (indices into ``votes [C]``), sorted ascending; optional max-pooling first.

    Example (worked example: the votes above, top-2 → {0, 2}):
        >>> pick_tokens(torch.tensor([0.5952, 0.5477, 0.7361, 0.1211]), 2).tolist()
        [0, 2]
    """
    if kernel_size > 0:
        votes = torch.nn.functional.max_pool1d(votes[None, None], kernel_size, stride=1,
                                               padding=(kernel_size - 1) // 2)[0, 0]
    return votes.topk(min(int(top_k), votes.numel())).indices.sort().values


@register_intervention
class TokenSelect(FullLayersWithRotary, Intervention):
    name = "token-select"
    description = "TokenSelect: per-layer top-k tokens by per-head soft voting, at compacted positions"
    requires = frozenset({"text_decoder", "rope"})
    conformance = {
        "neutral": {"top_k": 100_000}, "active": {"n_init": 1, "n_local": 2, "top_k": 1, "prefill_chunk": 2},
        "not_applicable": {"generate": "chunked selection: a recomputed sequence is chunked differently from a "
                                       "prefill followed by decode steps"}}

    def __init__(self, n_init: int = 128, n_local: int = 512, top_k: int = 2048, prefill_chunk: int = 512,
                 positions: str = "compact", gqa_map: str = "group", kernel_size: int = -1, **target):
        if target.get("heads") is not None:
            raise ValueError("token-select: the selection is shared by every head of a layer; do not pass heads")
        if positions not in POSITIONS:
            raise ValueError(f"token-select: positions must be one of {POSITIONS}, got {positions!r}")
        if gqa_map not in GQA_MAPS:
            raise ValueError(f"token-select: gqa_map must be one of {GQA_MAPS}, got {gqa_map!r}")
        super().__init__(**target)
        self.n_init = check_int(self.name, "n_init", n_init)
        self.n_local = check_int(self.name, "n_local", n_local, 1)
        self.top_k = check_int(self.name, "top_k", top_k, 1)
        self.prefill_chunk = check_int(self.name, "prefill_chunk", prefill_chunk, 1)
        if self.n_local < self.prefill_chunk:
            raise ValueError(f"token-select: n_local ({n_local}) must be ≥ prefill_chunk ({prefill_chunk}): the "
                             "local window holds the chunk being prefilled")
        self.positions, self.gqa_map, self.kernel_size = positions, gqa_map, int(kernel_size)
        self.account = KeyAccount()

    # ---- one chunk of one sample ----------------------------------------------------------------------------------
    def _chunk(self, ctx, b: int, slots: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor):
        """Attention of query rows ``rows`` (call row indices) of sample ``b`` whose real cached keys so far are the
        slots ``slots [N]`` (ascending) → (out ``[H, R, D]``, kept slots ``[S]``) or None (full attention)."""
        n = slots.numel()
        if self.n_init + self.top_k + self.n_local >= n:
            return None
        rot = self._rot(ctx.layer)
        q = ctx.query[b, :, rows]  # [H, R, D] post-RoPE
        q_slots = ctx.k_len - ctx.q_len + rows  # [R]
        q_raw = rot.unrotate(q, pos[b, q_slots][None].expand(q.shape[0], -1))  # [H, R, D]
        at = torch.arange(self.n_local, self.n_local + rows.numel(), device=q.device).float()
        q_fp = rot.shift(q_raw, at[None].expand(q.shape[0], -1)).float().mean(1)  # [H, D]
        cand = slots[self.n_init: n - self.n_local]  # [C]
        k_cand = ctx.key[b][:, cand]  # [Hkv, C, D]
        k_raw = rot.unrotate(k_cand, pos[b, cand][None].expand(k_cand.shape[0], -1))
        chosen = cand[pick_tokens(soft_votes(q_fp, k_raw, self.gqa_map), self.top_k, self.kernel_size)]
        kept = torch.cat([slots[: self.n_init], chosen, slots[n - self.n_local:]])  # [S] ascending slots
        k, v = ctx.key[b][:, kept], ctx.value[b][:, kept]  # [Hkv, S, D]
        rank_q = torch.searchsorted(kept, q_slots)  # [R] each query's index in the gathered list
        if self.positions == "compact":
            idx = torch.arange(kept.numel(), device=q.device)
            k = rot.shift(k, (idx - pos[b, kept])[None].expand(k.shape[0], -1).float())
            q = rot.shift(q, (rank_q - pos[b, q_slots])[None].expand(q.shape[0], -1).float())
        allowed = torch.arange(kept.numel(), device=q.device)[None, :] <= rank_q[:, None]  # [R, S] causal by index
        out = gathered_attention(q[None], expand_kv(k[None], q.shape[0]), expand_kv(v[None], q.shape[0]),
                                 allowed[None, None], scaling=scaling_of(ctx), softcap=softcap_of(ctx))
        return out[0], kept

    def edit_output(self, out, ctx):
        real = real_keys(ctx)  # [B, K]
        pos = key_rope_positions(ctx)  # [B, K]
        first_row = ctx.k_len - ctx.q_len
        out = out.clone()
        # the account's keep mask: decode calls only (a prefill would need a [Q, K] matrix)
        keep = None if ctx.is_prefill else torch.zeros(ctx.batch, 1, ctx.q_len, ctx.k_len, dtype=torch.bool,
                                                       device=ctx.device)
        for b in range(ctx.batch):
            real_rows = real[b, first_row:].nonzero().flatten()  # [R] call rows holding real tokens
            for c0 in range(0, real_rows.numel(), self.prefill_chunk):
                rows = real_rows[c0: c0 + self.prefill_chunk]
                slots = real[b, : first_row + int(rows[-1]) + 1].nonzero().flatten()  # real keys cached so far
                result = self._chunk(ctx, b, slots, rows, pos)
                if result is None:
                    if keep is not None:
                        keep[b, 0, rows, : first_row + int(rows[-1]) + 1] = True
                    continue
                out[b, :, rows] = result[0].to(out.dtype)
                if keep is not None:
                    keep[b, 0, rows[:, None], result[1][None, :]] = True
        if keep is not None:
            self.account.add(ctx.layer, keep, visible(ctx), ctx.heads,
                             ctx.query_mask("real") if ctx.tracker is not None else None)
        return out
