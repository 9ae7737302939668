"""RazorAttention (Tang et al., ICLR 2025, arXiv 2407.15891), METHODS-2.md §1: retrieval heads (echo + induction)
keep their whole KV cache; every other KV head keeps sinks, a recent window and one compensation token.

No code was released with the paper; attnkit follows the authors' company's implementations [code-vendor]:

**Head scoring** (:func:`razor_head_scores`, msModelSlim's indexing): ``period`` (``P = 2500``) random ids drawn
uniformly from ``[10000, 12500]`` (both ends), repeated ``repeats = 4`` times, after one start token (the config's
``bos_token_id``, Golden-Stick's choice; ``start_token`` overrides); one prefill. With the start token stripped and
the random tokens numbered ``0..4P−1``, every query ``i ≥ P`` scores ``echo_i = Σ_{j∈E(i)} A[i, j]`` (earlier copies of
itself, ``E(i) = {j < i, j ≡ i mod P}``) and ``induction_i = Σ_{j∈E(i)} A[i, j+1]`` (their successors); a head's score is
the mean over those queries. The causal softmax normaliser comes from the fused CPU flash kernel's log-sum-exp
(or a chunked pass), and only the ≤ 6 diagonal logits per row are gathered: no ``[T, T]`` matrix. Golden-Stick's
off-by-one (the start token counted as an earlier copy) is not reproduced. ``seed`` defaults to 2025 (the
Golden-Stick vLLM variant; msModelSlim is unseeded) and is recorded in the scores.

**Selection** (:func:`razor_retrieval_heads`): a KV head's score is the max over its query heads; the KV-head
scores of all layers are pooled, ``n = round(N_kv · ratio)`` (Python's half-to-even), and every KV head whose score
is among the top ``n`` values is selected (ties at the boundary admit extra heads); retrieval heads = the union of
the ``induction_ratio = 0.14`` and ``echo_ratio = 0.01`` selections (Golden-Stick's union merges only the first
echo layer — a bug not reproduced).

**Deployment** (:class:`RazorAttention`, the Golden-Stick deploy cell by default): prefill runs full attention for
every head; afterwards every non-retrieval KV head whose cache holds ``n > capacity`` (256) real tokens keeps the
first ``sinks`` (4), folds the next ``n − capacity + 1`` tokens into **one** compensation key/value (their plain
mean), and keeps the last ``capacity − sinks − 1`` (251): exactly ``capacity`` slots. Decode tokens are appended
and nothing is evicted again. Flags: ``use_virtual_token=False`` keeps ``sinks`` + the last ``capacity − sinks``;
``buffer="paper"`` keeps ``sinks`` + the last ``max(paper_min_recent, ⌈N / paper_ratio⌉)`` tokens (the paper's
``max(S0, N/C)``; the defaults 256 and 4 are unverified); ``compensation_weight="count"`` adds ``ln|D|`` to the
compensation token's logit (the paper's eq. 4/5: it then reproduces exact attention over the folded keys when
they share one key); ``recompress_every_step=True`` folds again at every decode step (the paper read literally).

Sliding-window layers (Gemma-3's local layers, whose cache is already bounded) are left alone.

Simulation: at decode calls each KV head's compensation key/value is appended to the call's keys and the folded keys
of the compressed heads get ``−∞`` (``edit_kv``: one attention pass, every backend; the appended key carries the
``ln|D|`` weight in ``count`` mode and ``−∞`` on the retrieval heads); all ``g`` query heads of a KV head share its
compressed cache.
:meth:`RazorAttention.kv_fraction` gives the fraction of KV memory such a cache keeps, and :attr:`account` the keys
each decode step attends.

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")                       # 2 layers, 4 heads on 2 KV heads
    >>> echo, induction = razor_head_scores(model, period=6, repeats=3, low=10, high=40, start_token=1)
    >>> echo.scores.shape, induction.method
    (torch.Size([2, 4]), 'razor-induction')
    >>> heads = razor_retrieval_heads(echo, induction, echo_ratio=0.25, induction_ratio=0.25)
    >>> razor = RazorAttention(retrieval_heads=heads, sinks=1, capacity=4)
    >>> with attnkit.attach(model, [razor]):
    ...     _ = model.generate(torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17]]), max_new_tokens=2, do_sample=False)
    >>> razor.account.summary()["mean_keys"]    # half the heads: 1 sink + compensation + 2 recent + new; half: all 9
    7.0
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.kvcache._sparse import KeyAccount, check_int, expand_kv, full_attention_layers, \
    real_keys, scaling_of, softcap_of
from attnkit.scores import HeadScores
from attnkit.targets import Target

BUFFERS = ("vendor", "paper")
WEIGHTS = ("none", "count")


# ---- scoring ---------------------------------------------------------------------------------------------------------
def repeated_random_tokens(period: int, repeats: int, low: int, high: int, seed: int, start_token: int) -> torch.Tensor:
    """``[1, 1 + period·repeats]`` ids: the start token, then ``period`` uniform ids in ``[low, high]`` repeated."""
    gen = torch.Generator().manual_seed(int(seed))
    block = torch.randint(int(low), int(high) + 1, (int(period),), generator=gen)  # both ends included
    return torch.cat([torch.tensor([int(start_token)]), block.repeat(int(repeats))])[None]


def diagonal_scores(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, period: int, scaling: float,
                    softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo and induction score per query head → two ``[H]`` tensors.

    q ``[H, T, D]``, k ``[H, T, D]`` (post-RoPE, KV expanded), lse ``[H, T]`` the causal row log-sum-exp; position 0
    is the start token, positions ``1..T−1`` the repeated block (msModelSlim's stripped indexing)."""
    T = q.shape[1]
    n = T - 1  # random tokens
    rows = torch.arange(period, n, device=q.device) + 1  # un-stripped positions of the scored queries
    echo = torch.zeros(q.shape[0], rows.numel(), device=q.device)
    induction = torch.zeros_like(echo)
    for m in range(1, n // period + 1):
        valid = rows - 1 - m * period >= 0  # an m-th earlier copy exists
        src = rows[valid]
        for offset, acc in ((0, echo), (1, induction)):
            keys = src - m * period + offset  # [R'] earlier copy (0) or its successor (1)
            logit = (q[:, src].float() * k[:, keys].float()).sum(-1) * scaling  # [H, R']
            if softcap is not None:
                logit = torch.tanh(logit / softcap) * softcap
            acc[:, valid] += torch.exp(logit - lse[:, src].float())
    return echo.mean(-1), induction.mean(-1)


def row_logsumexp(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None = None,
                  chunk: int = 512) -> torch.Tensor:
    """Causal row log-sum-exp ``[H, T]`` of q ``[H, T, D]`` against k ``[H, T, D]`` (fused CPU flash kernel when it
    applies, else query chunks: ``O(chunk·T)`` memory)."""
    H, T, _ = q.shape
    if softcap is None and q.device.type == "cpu":
        try:
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[None].float(), k[None].float(), k[None, :, :, :1].float(), 0.0, True, attn_mask=None, scale=scaling)
            return out[1][0]
        except (RuntimeError, AttributeError):  # pragma: no cover - older torch builds
            pass
    lse = torch.empty(H, T, device=q.device)
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        s = torch.einsum("hqd,hkd->hqk", q[:, c0:c1].float(), k[:, :c1].float()) * scaling  # [H, C, c1]
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        causal = torch.arange(c1, device=q.device)[None] <= torch.arange(c0, c1, device=q.device)[:, None]
        lse[:, c0:c1] = s.masked_fill(~causal, float("-inf")).logsumexp(-1)
    return lse


class _RazorScorer(Intervention):
    """Reads every layer's post-RoPE q/k at the scoring prefill and keeps echo/induction scores (no edit)."""

    name = "razor-scorer"

    def __init__(self, period: int):
        super().__init__()
        self.period = period
        self.echo: dict[int, torch.Tensor] = {}
        self.induction: dict[int, torch.Tensor] = {}

    def score_bias(self, ctx):
        q = ctx.query[0]  # [H, T, D]
        k = expand_kv(ctx.key, ctx.num_heads)[0]  # [H, T, D]
        scaling, softcap = scaling_of(ctx), softcap_of(ctx)
        lse = row_logsumexp(q, k, scaling, softcap)  # [H, T]
        self.echo[ctx.layer], self.induction[ctx.layer] = diagonal_scores(q, k, lse, self.period, scaling, softcap)
        return None


def razor_head_scores(model, *, period: int = 2500, repeats: int = 4, low: int = 10000, high: int = 12500,
                      seed: int = 2025, start_token: int | None = None) -> tuple[HeadScores, HeadScores]:
    """Echo and induction scores of every (layer, query head) of ``model`` → ``(echo, induction)`` HeadScores
    ``[L, H]`` (see the module docstring; defaults are the vendors': 2500 ids from [10000, 12500], 4 repeats)."""
    import attnkit
    from attnkit.interventions.scoring._common import model_name

    config = model.config.get_text_config(decoder=True)
    if start_token is None:
        start_token = getattr(config, "bos_token_id", None)
        if start_token is None:
            raise ValueError("razor: the model config has no bos_token_id; pass start_token")
    if high >= config.vocab_size:
        raise ValueError(f"razor: token ids up to {high} exceed the vocabulary ({config.vocab_size}); lower high")
    ids = repeated_random_tokens(period, repeats, low, high, seed, start_token)
    scorer = _RazorScorer(period)
    device = next(model.parameters()).device
    with attnkit.attach(model, [scorer], backend="torch"), torch.no_grad():
        model(input_ids=ids.to(device), use_cache=False)
    params = {"period": period, "repeats": repeats, "low": low, "high": high, "seed": seed,
              "start_token": int(start_token),
              "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)}
    data = f"{repeats}x{period} random ids in [{low}, {high}], seed {seed}"
    stack = lambda d: torch.stack([d[i].cpu() for i in sorted(d)])  # noqa: E731 - {layer: [H]} -> [L, H]
    return (HeadScores(stack(scorer.echo), "razor-echo", model_name(model), data, params),
            HeadScores(stack(scorer.induction), "razor-induction", model_name(model), data, params))


def kv_head_scores(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[L, H]`` per query head → ``[L, Hkv]``: the max over each KV head's query heads."""
    L, H = scores.shape
    return scores.view(L, num_kv_heads, H // num_kv_heads).amax(-1)


def pooled_top(kv_scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool ``[L, Hkv]``: KV heads whose score is among the top ``round(N · ratio)`` of all layers (ties admitted).

    Example (METHODS-2.md §1.3 selection, induction with ratio 0.5, echo with ratio 0.25):
        >>> pooled_top(torch.tensor([[0.40, 0.05], [0.30, 0.60]]), 0.5).int().tolist()
        [[1, 0], [0, 1]]
        >>> pooled_top(torch.tensor([[0.02, 0.09], [0.01, 0.03]]), 0.25).int().tolist()
        [[0, 1], [0, 0]]
    """
    n = round(kv_scores.numel() * ratio)
    if n <= 0:
        return torch.zeros_like(kv_scores, dtype=torch.bool)
    cut = kv_scores.flatten().sort(descending=True).values[min(n, kv_scores.numel()) - 1]
    return kv_scores >= cut


def razor_retrieval_heads(echo: HeadScores, induction: HeadScores, *, num_kv_heads: int | None = None,
                          echo_ratio: float = 0.01, induction_ratio: float = 0.14) -> HeadScores:
    """The retrieval heads: union of the pooled top ``induction_ratio`` induction and ``echo_ratio`` echo KV heads,
    as a HeadScores over query heads (``selected`` marks every query head of a selected KV head; the scores are the
    induction scores). ``num_kv_heads`` defaults to the value recorded by :func:`razor_head_scores` or H."""
    L, H = induction.scores.shape
    hkv = num_kv_heads or induction.params.get("num_kv_heads") or H
    chosen = pooled_top(kv_head_scores(induction.scores, hkv), induction_ratio) | \
        pooled_top(kv_head_scores(echo.scores, hkv), echo_ratio)  # [L, Hkv]
    selected = chosen.repeat_interleave(H // hkv, dim=1)  # [L, H]
    params = dict(induction.params, echo_ratio=echo_ratio, induction_ratio=induction_ratio, num_kv_heads=hkv)
    return HeadScores(induction.scores.clone(), "razor-retrieval", induction.model, induction.data, params, selected)


# ---- deployment --------------------------------------------------------------------------------------------------
def compressed_layout(n: int, sinks: int, capacity: int, virtual: bool = True) -> tuple[range, range, range]:
    """Vendor cache layout of ``n`` real tokens → ``(kept sinks, folded, kept recent)`` as index ranges.

    Example (METHODS-2.md §1.3: 300 prompt tokens, capacity 256):
        >>> s, d, r = compressed_layout(300, 4, 256)
        >>> (s.start, s.stop), (d.start, d.stop), (r.start, r.stop), len(d), len(r)
        ((0, 4), (4, 49), (49, 300), 45, 251)
    """
    if n <= capacity:
        return range(0, n), range(0, 0), range(n, n)
    recent = capacity - sinks - (1 if virtual else 0)
    folded = range(sinks, n - recent) if virtual else range(0, 0)
    return range(0, sinks), folded, range(n - recent, n)


def _retrieval_kv(heads, num_layers: int, num_heads: int, group: int) -> dict[int, set]:
    """``{layer: {kv heads}}`` from a HeadScores (selected), a ``{layer: [query heads]}`` dict or a saved path."""
    if isinstance(heads, (str, Path)):
        heads = HeadScores.load(heads)
    if isinstance(heads, HeadScores):
        if heads.selected is None:
            raise ValueError("razor: the HeadScores has no selection; select retrieval heads first "
                             "(razor_retrieval_heads)")
        heads = heads.layer_heads()
    return {int(layer): {h // group for h in hs} for layer, hs in (heads or {}).items()}


@register_intervention
class RazorAttention(Intervention):
    name = "razor-attention"
    description = "RazorAttention: full KV for echo/induction heads; sinks + recent + one compensation token elsewhere"
    requires = frozenset({"text_decoder"})
    conformance = {
        "neutral": {"capacity": 100_000}, "active": {"sinks": 1, "capacity": 3, "retrieval_heads": {0: [0]}},
        "not_applicable": {"generate": "a KV-cache policy applied after prefill: a recomputed prefill attends fully"}}

    def __init__(self, retrieval_heads=None, sinks: int = 4, capacity: int = 256, use_virtual_token: bool = True,
                 buffer: str = "vendor", compensation_weight: str = "none", recompress_every_step: bool = False,
                 paper_min_recent: int = 256, paper_ratio: float = 4.0, **target):
        if target.get("heads") is not None:
            raise ValueError("razor-attention: give retrieval_heads ({layer: [query heads]} or HeadScores); the other "
                             "heads are compressed")
        if buffer not in BUFFERS:
            raise ValueError(f"razor-attention: buffer must be one of {BUFFERS}, got {buffer!r}")
        if compensation_weight not in WEIGHTS:
            raise ValueError(f"razor-attention: compensation_weight must be one of {WEIGHTS}, got "
                             f"{compensation_weight!r}")
        super().__init__(**target)
        self.retrieval_heads = retrieval_heads
        self.sinks = check_int(self.name, "sinks", sinks)
        self.capacity = check_int(self.name, "capacity", capacity, self.sinks + 2)
        self.use_virtual_token, self.buffer = bool(use_virtual_token), buffer
        self.compensation_weight, self.recompress_every_step = compensation_weight, bool(recompress_every_step)
        self.paper_min_recent, self.paper_ratio = int(paper_min_recent), float(paper_ratio)
        self.account = KeyAccount()
        self._info: dict = {}

    def setup(self, model) -> None:
        text = model.component("text")
        group = text.kv_group
        retrieval = _retrieval_kv(self.retrieval_heads, text.num_layers, text.num_heads, group)
        heads = {}
        for layer in full_attention_layers(model, self.target.layers, self.name):
            compressed = [h for h in range(text.num_heads) if h // group not in retrieval.get(layer, set())]
            if compressed:
                heads[layer] = compressed
        if not heads:
            raise ValueError("razor-attention: every KV head of the targeted layers is a retrieval head; nothing "
                             "is compressed")
        #: ``{layer: [query heads]}`` of the compressed (non-retrieval) KV heads
        self.compressed_heads = heads
        # the compensation key is appended with edit_kv, which changes the key count, so every head of the layer is
        # a target: retrieval heads get a -inf bias on the appended key and see everything else
        self.target = Target(layers=sorted(heads), modules=self.target.modules)
        self._head_mask = {layer: torch.tensor([h in hs for h in range(text.num_heads)]) for layer, hs in heads.items()}
        self._info = {"layers": text.num_layers, "kv_heads": text.num_kv_heads, "group": group,
                      "compressed_kv": sum(len({h // group for h in hs}) for hs in heads.values())}

    # ---- which keys a non-retrieval head keeps -----------------------------------------------------------------------
    def _layout(self, n: int) -> tuple[int, int, int]:
        """(sinks kept, folded count, recent kept) for ``n`` real tokens in the head's cache."""
        if self.buffer == "paper":
            recent = max(self.paper_min_recent, math.ceil(n / self.paper_ratio))
            if n <= self.sinks + recent:
                return n, 0, 0
            return self.sinks, (n - self.sinks - recent) if self.use_virtual_token else 0, recent
        s, d, r = compressed_layout(n, self.sinks, self.capacity, self.use_virtual_token)
        return len(s), len(d), len(r)

    def _compress(self, ctx, real: torch.Tensor, upto: torch.Tensor) -> dict:
        """Per sample: keep mask over slots ``< upto[b]``, compensation key/value ``[B, Hkv, D]`` and count ``[B]``."""
        B, K = real.shape
        keep = torch.zeros(B, K, dtype=torch.bool, device=ctx.device)
        folded = torch.zeros_like(keep)
        for b in range(B):
            slots = real[b, : int(upto[b])].nonzero().flatten()
            n_sink, n_fold, n_recent = self._layout(slots.numel())
            if n_fold == 0 and n_recent == 0:  # nothing compressed
                keep[b, slots] = True
                continue
            keep[b, slots[:n_sink]] = True
            keep[b, slots[slots.numel() - n_recent:]] = True
            folded[b, slots[n_sink: n_sink + n_fold]] = True
        count = folded.sum(-1)  # [B]
        weight = folded.float() / count.clamp_min(1)[:, None]  # [B, K]
        k_hat = torch.einsum("bk,bhkd->bhd", weight, ctx.key.float())  # [B, Hkv, D] plain mean (fp32)
        v_hat = torch.einsum("bk,bhkd->bhd", weight, ctx.value.float())
        return {"keep": keep, "k_hat": k_hat, "v_hat": v_hat, "count": count}

    def edit_kv(self, q, k, v, ctx):
        """Decode calls: append each KV head's compensation key/value and mask the folded keys of the compressed heads
        (``−∞``), with the ``ln|D|`` weight on the appended key in ``count`` mode; retrieval heads never see it."""
        state = ctx.state
        real = real_keys(ctx)  # [B, K]
        if ctx.is_prefill or "prompt_slots" not in state:
            state["prompt_slots"] = torch.full((ctx.batch,), ctx.k_len, dtype=torch.long, device=ctx.device)
            return None  # prefill: full attention for every head
        if self.recompress_every_step:
            upto = torch.full((ctx.batch,), ctx.k_len - ctx.q_len, dtype=torch.long, device=ctx.device)
            comp = self._compress(ctx, real, upto)
        else:
            if "comp" not in state:
                state["comp"] = self._compress(ctx, real, state["prompt_slots"])
            comp = state["comp"]
        B, K, Q, H = ctx.batch, ctx.k_len, ctx.q_len, ctx.num_heads
        keep = torch.nn.functional.pad(comp["keep"], (0, K - comp["keep"].shape[1]))  # [B, K]
        first_new = state["prompt_slots"][:, None] if not self.recompress_every_step else \
            torch.full((B, 1), K - Q, device=ctx.device)
        keep = (keep | (torch.arange(K, device=ctx.device)[None] >= first_new)) & real  # decode tokens stay
        has_comp = comp["count"] > 0  # [B]
        compressed = self._head_mask[ctx.layer].to(ctx.device).view(1, H, 1, 1)  # [1, H, 1, 1]
        neg = torch.tensor(float("-inf"), device=ctx.device)
        zero = torch.zeros((), device=ctx.device)
        cache_bias = torch.where(keep[:, None, None, :] | ~compressed, zero, neg)  # [B, H, 1, K]
        comp_logit = comp["count"].clamp_min(1).float().log() if self.compensation_weight == "count" else \
            torch.zeros(B, device=ctx.device)
        comp_bias = torch.where(has_comp.view(B, 1, 1, 1) & compressed, comp_logit.view(B, 1, 1, 1), neg)  # [B,H,1,1]
        k = torch.cat([k, comp["k_hat"][:, :, None].to(k.dtype)], dim=2)  # [B, Hkv, K+1, D]
        v = torch.cat([v, comp["v_hat"][:, :, None].to(v.dtype)], dim=2)
        causal = torch.arange(K, device=ctx.device)[None] <= torch.arange(K - Q, K, device=ctx.device)[:, None]
        seen = (real[:, None, :] & causal[None])[:, None]  # [B, 1, Q, K] visible under a causal model mask
        attended = seen & (keep[:, None, None, :] | ~compressed)  # [B, H, Q, K] retrieval heads see every key
        self.account.add(ctx.layer, attended, seen, None, ctx.query_mask("real") if ctx.tracker is not None else None,
                         extra=(has_comp[:, None] & compressed.view(1, H)).float())  # [B, H] compensation token
        return q, k, v, torch.cat([cache_bias, comp_bias], dim=-1)  # bias [B, H, 1, K+1]

    def kv_fraction(self, prompt_len: int, generated: int = 0) -> float:
        """Fraction of a full KV cache this policy keeps after a ``prompt_len``-token prefill and ``generated``
        decode steps (vendor layout: compressed heads hold ``min(n, capacity)`` slots plus every new token)."""
        info = self._info
        if not info:
            raise RuntimeError("razor-attention: attach it to a model first (the fraction needs the model's shape)")
        total_kv = info["layers"] * info["kv_heads"]
        n_sink, n_fold, n_recent = self._layout(prompt_len)
        kept_prompt = prompt_len if (n_fold == 0 and n_recent == 0) else n_sink + n_recent + (1 if n_fold else 0)
        full = total_kv * (prompt_len + generated)
        kept = full - info["compressed_kv"] * (prompt_len - kept_prompt)
        return kept / full
