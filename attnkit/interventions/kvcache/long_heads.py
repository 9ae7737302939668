"""LongHeads (Lu et al., arXiv 2402.10685; repo LuLuLuyi/LongHeads), METHODS-2.md §8c: every head attends to a few
chunks of the context, chosen per head by chunk summary keys, at compacted positions — simulated exactly.

Rule (released code, ``modeling_longheads/modeling_llama.py``):

* the context is cut into chunks of ``window_size`` (``w``, default 256) real tokens; each head attends to at most
  ``atten_length`` tokens (default 4096: ``k_c = atten_length / w`` chunks);
* **chunk summary key** (per head, per complete chunk, computed once): bidirectional attention inside the chunk with
  q and k rotated by *local* positions ``p mod w``; ``v̄`` = the mean of its outputs over the chunk; the summary is
  ``Σ_j softmax_j(v̄·k̃_j/√d)·k̃_j`` over the chunk's locally rotated keys ``k̃``;
* **decode** with ``N`` tokens (the current one included): ``g = ⌊N/w⌋`` complete chunks and a partial chunk of
  ``N mod w`` tokens; per head the top ``k_c − 3`` middle chunks ``1..g−2`` by ``q_raw·summary`` (``q_raw`` the
  un-rotated query), plus chunk 0, chunk ``g−1`` and the partial chunk, sorted by index; the gathered keys sit at
  positions ``0..R−1`` (``R = (k_c−1)·w + N mod w``) and the query at ``R − 1`` (``positions="compact"``). When every
  middle chunk fits (``g ≤ k_c − 1``) the head attends fully at the original positions;
* **prefill**: the first ``begin_selective_length`` (default 4096) tokens attend causally at their own positions.

``positions="original"`` keeps the chosen keys at their own positions (a key mask): the approximation the spec asks
to label, which also gives up the method's purpose (staying within ``atten_length`` positions). Prompts longer than
``begin_selective_length`` are refused (the per-query selection of long prefills is not simulated). Sliding-window
layers (Gemma-3's local layers) are left alone. GQA: the chunk summaries and selections are per query head (the
release is MHA only; attnkit reads each query head's KV head).

Simulation (``edit_kv``, one attention pass on every backend): at a decode step every head's selected keys are moved
to their compacted positions (post-RoPE keys re-rotated by ``position − original``; ``k``/``v`` expanded to the query
heads since every head has its own selection), the others get ``−∞``, and the query moves to ``R − 1``.
:attr:`LongHeads.account` counts the keys each decode step attends. One new token per decode call (as ``generate``
runs it).

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> lh = LongHeads(window_size=2, atten_length=8, begin_selective_length=64)     # k_c = 4 chunks
    >>> with attnkit.attach(model, [lh]):
    ...     _ = model.generate(torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 21]]), max_new_tokens=2,
    ...                        do_sample=False)
    >>> lh.account.summary()["mean_keys"]            # N = 11: chunks 0, 1 of c1..c3, 4 and the current token
    7.0
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.kvcache._sparse import FullLayersWithRotary, KeyAccount, check_int, expand_kv, \
    key_rope_positions, real_keys, scaling_of
from attnkit.rope import Rotary

POSITIONS = ("compact", "original")


def chunk_summary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, rot: Rotary, w: int,
                  scaling: float) -> torch.Tensor:
    """Summary keys of one complete chunk → ``[H, D]``. q ``[H, w, D]``, k/v ``[H, w, D]`` (post-RoPE at ``pos [w]``,
    k/v already expanded to query heads).

    Locally rotated (positions ``p mod w``), bidirectional attention inside the chunk, ``v̄`` its mean output, then
    the ``v̄``-attention-weighted mean of the local keys."""
    local = (pos % w - pos).float()  # [w] shift to local positions
    q_loc = rot.shift(q, local[None].expand(q.shape[0], -1)).float()  # [H, w, D]
    k_loc = rot.shift(k, local[None].expand(k.shape[0], -1)).float()  # [H, w, D]
    probs = torch.softmax(torch.einsum("hid,hjd->hij", q_loc, k_loc) * scaling, dim=-1)  # [H, w, w]
    v_bar = torch.einsum("hij,hjd->hid", probs, v.float()).mean(1)  # [H, D]
    weights = torch.softmax(torch.einsum("hd,hjd->hj", v_bar, k_loc) * scaling, dim=-1)  # [H, w]
    return torch.einsum("hj,hjd->hd", weights, k_loc)  # [H, D]


def select_chunks(scores: torch.Tensor, num_complete: int, partial: bool, k_c: int) -> torch.Tensor:
    """Chunk indices each head attends, sorted → long ``[H, n]``: chunk 0, the top ``k_c − 3`` middle chunks
    ``1..g−2`` by ``scores [H, g−2]``, chunk ``g−1`` and (``partial``) chunk ``g``.

    Example (METHODS-2.md §8c worked example: w = 2, k_c = 4, N = 11 → c0, c2 (best of c1..c3), c4, partial c5):
        >>> select_chunks(torch.tensor([[0.2, 0.9, 0.1]]), 5, True, 4).tolist()
        [[0, 2, 4, 5]]
    """
    g = num_complete
    middle = scores.topk(k_c - 3, dim=-1).indices + 1  # [H, k_c-3]
    fixed = torch.tensor([0, g - 1] + ([g] if partial else []), device=scores.device)
    chosen = torch.cat([middle, fixed[None].expand(scores.shape[0], -1)], dim=-1)
    return chosen.sort(dim=-1).values


@register_intervention
class LongHeads(FullLayersWithRotary, Intervention):
    name = "long-heads"
    description = "LongHeads: each head attends to its own top chunks (chunk summary keys) at compacted positions"
    requires = frozenset({"text_decoder", "rope"})
    conformance = {
        "neutral": {"window_size": 2, "atten_length": 100_000}, "active": {"window_size": 1, "atten_length": 4},
        "not_applicable": {"generate": "a decode-time method: a recomputed prefill attends fully, decode steps do not"}}

    def __init__(self, window_size: int = 256, atten_length: int = 4096, begin_selective_length: int = 4096,
                 positions: str = "compact", **target):
        if target.get("heads") is not None:
            raise ValueError("long-heads: every head selects its own chunks; do not pass heads")
        if positions not in POSITIONS:
            raise ValueError(f"long-heads: positions must be one of {POSITIONS}, got {positions!r}")
        super().__init__(**target)
        self.window_size = check_int(self.name, "window_size", window_size, 1)
        self.atten_length = check_int(self.name, "atten_length", atten_length, 1)
        self.begin_selective_length = check_int(self.name, "begin_selective_length", begin_selective_length, 1)
        self.k_c = self.atten_length // self.window_size
        if self.k_c < 4:
            raise ValueError(f"long-heads: atten_length / window_size = {self.k_c} chunks; at least 4 are needed "
                             "(chunk 0, one middle chunk, the last complete and the partial chunk)")
        self.positions = positions
        self.account = KeyAccount()

    # ---- chunk summaries -------------------------------------------------------------------------------------------
    def _summarise(self, ctx, b: int, state: dict, real_slots: torch.Tensor, pos: torch.Tensor) -> None:
        """Summarise sample ``b``'s complete chunks that have all their queries pending."""
        w, H = self.window_size, ctx.num_heads
        summaries, pending = state["summaries"][b], state["pending"][b]  # list of [H, D]; [H, n, D]
        while pending.shape[1] >= w:
            c = len(summaries)
            slots = real_slots[c * w:(c + 1) * w]  # [w]
            k = expand_kv(ctx.key[b:b + 1, :, slots], H)[0]  # [H, w, D]
            v = expand_kv(ctx.value[b:b + 1, :, slots], H)[0]
            summaries.append(chunk_summary(pending[:, :w], k, v, pos[b, slots], self._rot(ctx.layer), w,
                                           scaling_of(ctx)))
            pending = pending[:, w:]
        state["pending"][b] = pending

    def _remember(self, ctx, state: dict, real: torch.Tensor, pos: torch.Tensor, rows: slice | None = None) -> None:
        """Queue the real queries of this call's ``rows`` (default: all) for the chunk summaries, then summarise the
        chunks now complete."""
        first_row = ctx.k_len - ctx.q_len
        rows = rows or slice(0, ctx.q_len)
        for b in range(ctx.batch):
            picked = real[b, first_row:][rows].nonzero().flatten() + (rows.start or 0)  # [R] call rows
            state["pending"][b] = torch.cat([state["pending"][b], ctx.query[b][:, picked]], dim=1)
            self._summarise(ctx, b, state, real[b].nonzero().flatten(), pos)

    # ---- one decode step ------------------------------------------------------------------------------------------
    def _select(self, ctx, b: int, state: dict, real: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
        """Kept slots ``[H, S]`` (sorted; ``S = (k_c−1)·w + N mod w``) of sample ``b``'s decode query, or None when
        every chunk fits (full attention at the original positions)."""
        w, H = self.window_size, ctx.num_heads
        slot = ctx.k_len - 1
        real_slots = real[b, : slot + 1].nonzero().flatten()  # [N] the current token included
        g, rest = divmod(real_slots.numel(), w)
        if g <= self.k_c - 1:
            return None
        rot = self._rot(ctx.layer)
        q = ctx.query[b, :, -1:]  # [H, 1, D]
        q_raw = rot.unrotate(q, pos[b, slot].view(1, 1).expand(H, 1))[:, 0].float()  # [H, D]
        summaries = torch.stack(state["summaries"][b][1:g - 1], dim=1)  # [H, g-2, D] middle chunks
        chosen = select_chunks(torch.einsum("hd,hcd->hc", q_raw, summaries), g, rest > 0, self.k_c)  # [H, n_c]
        token_idx = (chosen[..., None] * w + torch.arange(w, device=q.device)).flatten(1)  # [H, n_c*w]
        token_idx = token_idx[:, : (self.k_c - 1) * w + rest] if rest > 0 else token_idx  # the partial chunk
        return real_slots[token_idx]  # [H, S]

    def edit_kv(self, q, k, v, ctx):
        """Decode steps: every head's keys moved to their compacted positions (``Rotary.shift``), its unselected keys
        ``−∞``, and the query moved to ``R − 1``; the backend then attends once."""
        state = ctx.state
        real = real_keys(ctx)  # [B, K]
        pos = key_rope_positions(ctx)  # [B, K]
        if ctx.is_prefill or "summaries" not in state:
            longest = int(real.sum(-1).max())
            if longest > self.begin_selective_length:
                raise ValueError(f"long-heads: a {longest}-token prompt is longer than begin_selective_length="
                                 f"{self.begin_selective_length}; the selective prefill beyond it is not simulated "
                                 "(raise begin_selective_length)")
            state["summaries"] = [[] for _ in range(ctx.batch)]
            state["pending"] = [q.new_zeros(ctx.num_heads, 0, q.shape[-1]) for _ in range(ctx.batch)]
            self._remember(ctx, state, real, pos)
            return None
        if ctx.q_len != 1:
            raise ValueError(f"long-heads simulates one new token per decode call (as generate runs it); this call "
                             f"has {ctx.q_len}")
        B, H, K = ctx.batch, ctx.num_heads, ctx.k_len
        rot = self._rot(ctx.layer)
        k_new, v_new = expand_kv(k, H).clone(), expand_kv(v, H)  # [B, H, K, D]
        q_new = q.clone()
        keep = torch.zeros(B, H, 1, K, dtype=torch.bool, device=q.device)
        for b in range(B):
            if not bool(real[b, -1]):
                keep[b] = True
                continue
            kept = self._select(ctx, b, state, real, pos)
            if kept is None:
                keep[b, :, 0] = real[b]
                continue
            keep[b, :, 0].scatter_(-1, kept, True)  # [H, K] view
            S = kept.shape[1]
            if self.positions == "compact":
                shift = torch.zeros(H, K, device=q.device)
                shift.scatter_(-1, kept, (torch.arange(S, device=q.device)[None] - pos[b][kept]).float())
                k_new[b] = rot.shift(k_new[b], shift)
                q_new[b] = rot.shift(q[b], torch.full((H, 1), float(S - 1) - float(pos[b, -1]), device=q.device))
        self._remember(ctx, state, real, pos)
        self.account.add(ctx.layer, keep, (real[:, None, None, :]), ctx.heads,
                         ctx.query_mask("real") if ctx.tracker is not None else None)
        bias = torch.zeros(keep.shape, device=q.device).masked_fill(~keep, float("-inf"))  # [B, H, 1, K]
        return q_new, k_new, v_new, bias
