"""DuoAttention (Xiao et al., ICLR 2025, arXiv 2410.10819; repo mit-han-lab/duo-attention), METHODS-2.md §2:
retrieval ("full") KV heads keep the whole cache, streaming heads keep sinks + a recent window.

**Deployment** (:class:`DuoAttention`, the released code by default):

* gates per (layer, KV head) — a :class:`~attnkit.scores.HeadScores` saved by :func:`duo_calibrate` (or the shipped
  ``full_attention_heads.tsv`` read with :func:`load_duo_gates`) — are binarised, over the layers the method restricts
  (every layer except sliding-window ones), like ``sparsify_attention_heads``:
  ``τ = quantile(gates, sparsity)`` (linear interpolation, after uniform noise in ``[0, 1e−6)`` to break ties;
  seeded), full heads ``gate ≥ τ``; ``sparsity ≥ 1`` makes none full, ``≤ 0`` all. ``threshold=0.5`` (the paper's
  ``gate > 0.5``) replaces the quantile;
* ``prefill="full"`` (code): a single-shot prefill runs ordinary causal attention for **every** head; the streaming
  caches are cut to the first ``sinks`` plus the last ``recent`` tokens afterwards. ``prefill="chunked"`` simulates
  ``--prefilling_chunk_size`` (``chunk`` tokens): a later chunk's streaming heads see the cached sinks, the last
  ``recent`` tokens before the chunk and the chunk itself. ``prefill="lambda"``: the training mask on every row;
* decode: a streaming head sees the sinks, the ``recent`` tokens cached before the step and the new token
  (``sinks + recent + 1`` keys); ``decode_window="lambda"`` keeps the training Λ (``i − j < recent``) instead;
* eval-script defaults ``sinks=64``, ``recent=256`` (training used 128/256); ``sparsity=0.5``.

Sliding-window layers (Gemma-3's local layers, whose cache is already bounded) are left alone. Keys keep their
original RoPE positions, so a ``−∞`` key mask (``score_bias``) is exact; the decision is per KV head
(all its query heads share the streaming cache).

**Head identification** (:func:`duo_calibrate`, opt-in, *not* training-free: it optimises ``L·H_kv`` scalars with the
model frozen): the batch is duplicated; in every layer the reference half runs ordinary attention and the gated half
mixes ``α·o_full(reference) + (1−α)·o_streaming(gated)`` per KV head (Λ mask: ``j < sink`` or ``i − j < recent``);
the loss is the mean squared difference of the final hidden states at the labelled (question + passkey) positions
plus ``λ·mean|α|``; AdamW (lr 0.02, no weight decay), gates clamped to ``[0, 1]``, linear warm-up/decay of
``steps // 5`` each floored at 0.1. Data (:func:`passkey_samples`): passkeys of NATO words hidden in a haystack
(the essays of the NIAH data set stand in for BookSum, which is not available here), the released prompt and
needle text (typo "Remeber" kept). The released values (2000 steps, 10 passkeys of 32 words, contexts 1000–32000,
Λ sink 128 / recent 256) are the defaults; pass smaller ones for a quick calibration on a small model.

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")                      # 2 layers x 2 KV heads
    >>> gates = HeadScores(torch.tensor([[0.9, 0.9, 0.2, 0.2], [0.55, 0.55, 0.4, 0.4]]), method="duo-attention",
    ...                    params={"kv_group": 2})
    >>> full_kv_heads(gates, sparsity=0.5)
    {0: [0], 1: [0]}
    >>> duo = DuoAttention(gates, sparsity=0.5, sinks=1, recent=2)
    >>> with attnkit.attach(model, [duo]):
    ...     _ = model.generate(torch.tensor([[1, 5, 7, 9, 11, 13]]), max_new_tokens=2, do_sample=False)
    >>> duo.account.summary()["mean_keys"]           # streaming heads at the decode step: 1 sink + 2 recent + new
    4.0
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.kvcache._sparse import KeyAccount, check_int, full_attention_layers, keep_bias, real_keys, \
    visible
from attnkit.scores import HeadScores
from attnkit.targets import Target

PREFILLS = ("full", "chunked", "lambda")
DECODE_WINDOWS = ("deploy", "lambda")


# ---- binarisation ---------------------------------------------------------------------------------------------------
def kv_gates(gates: HeadScores) -> torch.Tensor:
    """``[L, Hkv]`` gates from a HeadScores over query heads (each KV head's gate repeated ``kv_group`` times)."""
    group = int(gates.params.get("kv_group", 1))
    return gates.scores[:, ::group].clone()


def binarise(gates: torch.Tensor, sparsity: float | None = 0.5, threshold: float | None = None,
             seed: int = 0) -> torch.Tensor:
    """Bool ``[L, Hkv]`` full heads, as ``sparsify_attention_heads``: noise in ``[0, 1e−6)``, ``τ`` = the
    ``sparsity`` quantile (linear), full iff ``gate ≥ τ``; or ``gate > threshold`` when ``sparsity`` is None.

    Example (METHODS-2.md §2.4: gates [0.9, 0.2, 0.55, 0.4]):
        >>> g = torch.tensor([[0.9, 0.2, 0.55, 0.4]])
        >>> binarise(g, 0.5).int().tolist(), binarise(g, 0.75).int().tolist()
        ([[1, 0, 1, 0]], [[1, 0, 0, 0]])
        >>> binarise(g, None, threshold=0.5).int().tolist()
        [[1, 0, 1, 0]]
    """
    values = gates.double().numpy()
    if sparsity is None:
        if threshold is None:
            raise ValueError("duo-attention: give sparsity or threshold to binarise the gates")
        return torch.from_numpy(values > threshold)
    if sparsity >= 1:
        return torch.zeros(gates.shape, dtype=torch.bool)
    if sparsity <= 0:
        return torch.ones(gates.shape, dtype=torch.bool)
    noisy = values + np.random.default_rng(seed).uniform(0, 1e-6, values.shape)
    tau = np.quantile(noisy, sparsity)
    return torch.from_numpy(noisy >= tau)


def full_kv_heads(gates: HeadScores, sparsity: float | None = 0.5, threshold: float | None = None) -> dict:
    """``{layer: [full KV heads]}`` of binarised gates (see :func:`binarise`)."""
    full = binarise(kv_gates(gates), sparsity, threshold)
    return {layer: full[layer].nonzero().flatten().tolist() for layer in range(full.shape[0])}


def load_duo_gates(path, num_heads: int | None = None) -> HeadScores:
    """Read a released ``full_attention_heads.tsv`` (``L`` rows × ``H_kv`` gates) → HeadScores over query heads
    (``num_heads`` defaults to ``H_kv``: one query head per KV head)."""
    rows = [[float(x) for x in line.split()] for line in Path(path).read_text().splitlines() if line.strip()]
    gates = torch.tensor(rows)  # [L, Hkv]
    group = (num_heads or gates.shape[1]) // gates.shape[1]
    return HeadScores(gates.repeat_interleave(group, dim=1), "duo-attention", data=str(path),
                      params={"kv_group": group})


# ---- masks ---------------------------------------------------------------------------------------------------------
def sink_keys(real: torch.Tensor, sinks: int) -> torch.Tensor:
    """Bool ``[B, K]``: the first ``sinks`` real keys of each sample."""
    return real & (real.long().cumsum(-1) <= sinks)


def lambda_allowed(real: torch.Tensor, q_len: int, sinks: int, recent: int) -> torch.Tensor:
    """The training Λ: bool ``[B, Q, K]``, ``j`` a sink or ``i − j < recent`` (causality left to the model's mask).

    Example (METHODS-2.md §2.4: sink 2, recent 3, query 9):
        >>> lambda_allowed(torch.ones(1, 10, dtype=torch.bool), 1, 2, 3)[0, 0].nonzero().flatten().tolist()
        [0, 1, 7, 8, 9]
    """
    K = real.shape[1]
    q_pos = torch.arange(K - q_len, K, device=real.device)[:, None]  # [Q, 1]
    recent_ok = (q_pos - torch.arange(K, device=real.device)[None]) < recent  # [Q, K]
    return sink_keys(real, sinks)[:, None, :] | recent_ok[None]


def deploy_allowed(real: torch.Tensor, q_len: int, sinks: int, recent: int) -> torch.Tensor:
    """A call on a cache (decode step or later chunk): bool ``[B, 1, K]`` — the sinks, the ``recent`` real tokens
    cached before the call and the whole call (causal by the model's mask).

    Example (worked example: an 8-token prompt, sink 2, recent 3; decode token 8, then 9):
        >>> deploy_allowed(torch.ones(1, 9, dtype=torch.bool), 1, 2, 3)[0, 0].nonzero().flatten().tolist()
        [0, 1, 5, 6, 7, 8]
        >>> deploy_allowed(torch.ones(1, 10, dtype=torch.bool), 1, 2, 3)[0, 0].nonzero().flatten().tolist()
        [0, 1, 6, 7, 8, 9]
    """
    K = real.shape[1]
    before = real.clone()
    before[:, K - q_len:] = False
    from_end = before.flip(-1).long().cumsum(-1).flip(-1)  # [B, K] real tokens at or after each slot, before the call
    recent_ok = before & (from_end <= recent)
    call = torch.zeros_like(real)
    call[:, K - q_len:] = True
    return (sink_keys(real, sinks) | recent_ok | call)[:, None, :]


def chunked_allowed(real: torch.Tensor, chunk: int, sinks: int, recent: int) -> torch.Tensor:
    """A single-call prefill simulated in chunks of ``chunk`` real tokens: bool ``[B, Q=K, K]``; rows of chunk ``c ≥ 1``
    see the sinks, the last ``recent`` real tokens before the chunk and the chunk (causal by the model's mask).

    Example (worked example: sink 2, recent 3, C = 4, 8 tokens: token 7 sees all of 0-7):
        >>> chunked_allowed(torch.ones(1, 8, dtype=torch.bool), 4, 2, 3)[0, 7].nonzero().flatten().tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    B, K = real.shape
    index = real.long().cumsum(-1) - 1  # [B, K] real-token index
    chunk_of = torch.where(real, index // chunk, torch.full_like(index, -1))  # [B, K]
    start = (chunk_of * chunk).clamp_min(0)  # [B, K] first real index of the query's chunk
    q_chunk, k_chunk = chunk_of[:, :, None], chunk_of[:, None, :]  # [B, Q, 1], [B, 1, K]
    same = q_chunk == k_chunk
    before = (k_chunk < q_chunk) & real[:, None, :]
    recent_ok = before & (index[:, None, :] >= start[:, :, None] - recent)
    first = q_chunk <= 0  # chunk 0 (and padding rows): ordinary causal attention
    return first | same | recent_ok | sink_keys(real, sinks)[:, None, :]


def _checked_full_heads(full_heads):
    """``full_heads`` as given when it is None, gates (HeadScores), a saved path or ``{layer: [KV heads]}`` of
    integers; otherwise one ValueError naming the field and the forms it takes."""
    if full_heads is None or isinstance(full_heads, (str, Path, HeadScores)):
        return full_heads
    try:
        return {int(layer): [int(h) for h in heads] for layer, heads in full_heads.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"duo-attention: full_heads must be gates (HeadScores), a saved path or {{layer: [KV heads]}} "
                         f"of integers, got {full_heads!r}") from None


@register_intervention
class DuoAttention(Intervention):
    name = "duo-attention"
    description = "DuoAttention: full KV for gated retrieval heads, sinks + recent window for streaming heads"
    requires = frozenset({"text_decoder"})
    conformance = {
        "neutral": {"full_heads": {}, "recent": 100_000, "prefill": "lambda"},
        "active": {"full_heads": {0: [0]}, "sinks": 1, "recent": 2, "prefill": "lambda"},
        "not_applicable": {"generate": "a KV-cache policy: a recomputed prefill attends fully, decode steps stream"}}

    def __init__(self, full_heads=None, sparsity: float | None = 0.5, threshold: float | None = None,
                 sinks: int = 64, recent: int = 256, prefill: str = "full", chunk: int = 32000,
                 decode_window: str = "deploy", **target):
        if target.get("heads") is not None:
            raise ValueError("duo-attention: give full_heads (gates HeadScores, a saved path, or {layer: [KV heads]}); "
                             "the other heads stream")
        if prefill not in PREFILLS:
            raise ValueError(f"duo-attention: prefill must be one of {PREFILLS}, got {prefill!r}")
        if decode_window not in DECODE_WINDOWS:
            raise ValueError(f"duo-attention: decode_window must be one of {DECODE_WINDOWS}, got {decode_window!r}")
        super().__init__(**target)
        self.full_heads, self.sparsity, self.threshold = _checked_full_heads(full_heads), sparsity, threshold
        self.sinks = check_int(self.name, "sinks", sinks)
        self.recent = check_int(self.name, "recent", recent, 1)
        self.chunk = check_int(self.name, "chunk", chunk, 1)
        self.prefill, self.decode_window = prefill, decode_window
        self.account = KeyAccount()
        self._info: dict = {}

    def _full_kv(self, num_layers: int, layers: list[int]) -> dict[int, set]:
        """Full KV heads per layer; gates are binarised among ``layers`` (the layers the method may restrict)."""
        heads = self.full_heads
        if isinstance(heads, (str, Path)):
            heads = HeadScores.load(heads)
        if isinstance(heads, HeadScores):
            if heads.num_layers != num_layers:
                raise ValueError(f"duo-attention: the gates cover {heads.num_layers} layers, the model has {num_layers}")
            gates = kv_gates(heads)[layers]  # [len(layers), Hkv]
            full = binarise(gates, self.sparsity, self.threshold)
            return {layer: set(full[i].nonzero().flatten().tolist()) for i, layer in enumerate(layers)}
        return {int(k): set(v) for k, v in (heads or {}).items()}

    def setup(self, model) -> None:
        text = model.component("text")
        group = text.kv_group
        layers = full_attention_layers(model, self.target.layers, self.name)
        full = self._full_kv(text.num_layers, layers)
        streaming = {}
        for layer in layers:
            heads = [h for h in range(text.num_heads) if h // group not in full.get(layer, set())]
            if heads:
                streaming[layer] = heads
        if not streaming:
            raise ValueError("duo-attention: every KV head of the targeted layers is a full head; nothing streams")
        self.target = Target(layers=sorted(streaming), heads=streaming, modules=self.target.modules)
        self._info = {"layers": text.num_layers, "kv_heads": text.num_kv_heads,
                      "streaming_kv": sum(len({h // group for h in hs}) for hs in streaming.values())}

    def score_bias(self, ctx):
        real = real_keys(ctx)  # [B, K]
        if ctx.is_prefill:
            if self.prefill == "full":
                return None
            allowed = (lambda_allowed(real, ctx.q_len, self.sinks, self.recent) if self.prefill == "lambda"
                       else chunked_allowed(real, self.chunk, self.sinks, self.recent))  # [B, Q, K]
            return keep_bias(allowed[:, None])
        if self.decode_window == "lambda":
            allowed = lambda_allowed(real, ctx.q_len, self.sinks, self.recent)[:, None]  # [B, 1, Q, K]
        else:
            allowed = deploy_allowed(real, ctx.q_len, self.sinks, self.recent)[:, None]  # [B, 1, 1, K]
        self.account.add(ctx.layer, allowed, visible(ctx), ctx.heads,
                         ctx.query_mask("real") if ctx.tracker is not None else None)
        return keep_bias(allowed)

    def kv_fraction(self, seq_len: int) -> float:
        """Fraction of a full KV cache kept with ``seq_len`` tokens cached (streaming heads: ``sinks + recent``)."""
        info = self._info
        if not info:
            raise RuntimeError("duo-attention: attach it to a model first (the fraction needs the model's shape)")
        total = info["layers"] * info["kv_heads"]
        kept = min(seq_len, self.sinks + self.recent)
        return 1 - info["streaming_kv"] * (seq_len - kept) / (total * seq_len)


# ---- calibration: gate optimisation ---------------------------------------------------------------------------------
NATO = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa quebec "
        "romeo sierra tango uniform victor whiskey xray yankee zulu").split()
ORDINALS = ("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
            "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth").split()


def passkey_samples(tokenizer, *, num_samples: int = 50, min_len: int = 1000, max_len: int = 32000,
                    num_passkeys: int = 10, passkey_words: int = 32, seed: int = 0, haystack: str | None = None):
    """DuoAttention's synthetic retrieval data: a list of ``(input_ids [1, N], labels [1, N])`` with ``−100`` outside
    the QA tail. Context lengths ``linspace(min_len, max_len, num_samples)`` tokens; passkeys of ``passkey_words``
    NATO words at sorted depths drawn without replacement from ``linspace(0.05, 0.95, 1000)``."""
    if num_passkeys > len(ORDINALS):
        raise ValueError(f"duo-attention: at most {len(ORDINALS)} passkeys per sample")
    if haystack is None:
        from attnkit.eval.metrics.niah import essay_text

        haystack = essay_text()
    hay_ids = tokenizer(haystack, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    depths_grid = np.linspace(0.05, 0.95, 1000)
    samples = []
    for length in np.linspace(min_len, max_len, num_samples).astype(int):
        keys = [" ".join(rng.choice(NATO) for _ in range(passkey_words)) for _ in range(num_passkeys)]
        depths = sorted(rng.sample(list(depths_grid), num_passkeys))
        context = list(hay_ids[: int(length)])
        pieces, last = [], 0
        for depth, (ordinal, key) in zip(depths, zip(ORDINALS, keys)):
            cut = int(len(context) * depth)
            needle = f"\n\nRemeber this sequence of words, it's the {ordinal} passkey to the vault: {key}\n\n"
            pieces += [tokenizer.decode(context[last:cut]), needle]
            last = cut
        pieces.append(tokenizer.decode(context[last:]))
        prompt = "<|im_start|> This is a very long story book: <book> " + "".join(pieces) + " </book>.\n\n"
        tail = "".join(f"Based on the content of the book, what is the {ordinal} passkey to the vault?\nPasskey: "
                       f"{key}\n\n" for ordinal, key in zip(ORDINALS, keys))
        head_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([head_ids + tail_ids])
        labels = torch.tensor([[-100] * len(head_ids) + tail_ids])
        samples.append((ids, labels))
    return samples


def lr_multiplier(step: int, total: int) -> float:
    """The released schedule: ``min(1, max((s+1)/(N//5), 0.1), max((N−s)/(N//5), 0.1))``.

    Example (METHODS-2.md §2.4, N = 2000):
        >>> [lr_multiplier(s, 2000) for s in (0, 199, 399, 1000, 1700, 1999)]
        [0.1, 0.5, 1.0, 1.0, 0.75, 0.1]
    """
    w = max(1, total // 5)
    return min(1.0, max((step + 1) / w, 0.1), max((total - step) / w, 0.1))


def duo_loss(h_ref: torch.Tensor, h_gated: torch.Tensor, labels: torch.Tensor, gates: torch.Tensor,
             reg: float) -> torch.Tensor:
    """``mean over labelled positions of mean_d (h_ref − h_gated)² + reg·mean|gates|`` (fp32).

    Example (METHODS-2.md §2.4):
        >>> h_ref, h_g = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[1.5, 1.0]]])
        >>> round(float(duo_loss(h_ref, h_g, torch.tensor([[5]]), torch.tensor([1, 0.5, 0.2, 0]), 0.05)), 5)
        0.64625
    """
    where = labels != -100  # [B, N]
    diff = (h_ref.float() - h_gated.float()).pow(2).mean(-1)  # [B, N]
    return diff[where].mean() + reg * gates.abs().mean()


class _GatedStreams(Intervention):
    """Training-time intervention: batch row 0 is the reference, row 1 the gated stream (see :func:`duo_calibrate`)."""

    name = "duo-gates"

    def __init__(self, gates: torch.nn.Parameter, group: int, sinks: int, recent: int, layers=None):
        super().__init__(layers=layers)
        self.gates, self.group, self.sinks, self.recent = gates, group, sinks, recent

    def edit_output(self, out, ctx):
        from attnkit.interventions.kvcache._sparse import expand_kv, scaling_of

        q, k, v = ctx.query[1:], expand_kv(ctx.key[1:], ctx.num_heads), expand_kv(ctx.value[1:], ctx.num_heads)
        real = torch.ones(1, ctx.k_len, dtype=torch.bool, device=ctx.device)
        causal = torch.ones(ctx.q_len, ctx.k_len, dtype=torch.bool, device=ctx.device).tril(ctx.k_len - ctx.q_len)
        mask = lambda_allowed(real, ctx.q_len, self.sinks, self.recent)[0] & causal  # [Q, K]
        streaming = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling_of(ctx))
        alpha = self.gates[ctx.layer].clamp(0, 1).repeat_interleave(self.group).view(1, -1, 1, 1)  # [1, H, 1, 1]
        reference = out[:1].detach()  # [1, H, Q, D]: the clean model's full attention of this layer
        return torch.cat([reference, alpha * reference + (1 - alpha) * streaming.to(out.dtype)], dim=0)


def duo_calibrate(model, tokenizer, *, steps: int = 2000, lr: float = 0.02, reg: float = 0.05, sinks: int = 128,
                  recent: int = 256, samples=None, sample_kwargs: dict | None = None, seed: int = 0,
                  log_every: int = 0) -> HeadScores:
    """Optimise DuoAttention's gates on ``model`` (frozen) → HeadScores ``[L, H]`` (each KV head's gate repeated
    over its query heads; ``params["kv_group"]``) with the loss history in ``params["losses"]``.

    ``samples``: a list of ``(input_ids, labels)`` (default :func:`passkey_samples` with ``sample_kwargs``); step ``s``
    uses sample ``s mod len(samples)``. Only full-attention layers are gated (``params["layers"]``); the gates of
    sliding-window layers stay 1."""
    import attnkit
    from attnkit.hooks.transformers import text_model_of
    from attnkit.interventions.scoring._common import model_name

    torch.manual_seed(seed)
    text = text_model_of(model) or model
    config = model.config.get_text_config(decoder=True)
    n_layers = config.num_hidden_layers
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    group = config.num_attention_heads // n_kv
    samples = samples if samples is not None else passkey_samples(tokenizer, seed=seed, **(sample_kwargs or {}))
    layer_types = getattr(config, "layer_types", None) or []
    layers = [i for i in range(n_layers) if not layer_types or layer_types[i] != "sliding_attention"]
    gates = torch.nn.Parameter(torch.ones(n_layers, n_kv))
    optimiser = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: lr_multiplier(s, steps))
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    device = next(model.parameters()).device
    losses = []
    try:
        with attnkit.attach(model, [_GatedStreams(gates, group, sinks, recent, layers)], backend="torch"):
            for step in range(steps):
                with torch.no_grad():
                    gates.clamp_(0, 1)
                ids, labels = samples[step % len(samples)]
                hidden = text(input_ids=ids.repeat(2, 1).to(device), use_cache=False).last_hidden_state  # [2, N, C]
                loss = duo_loss(hidden[:1], hidden[1:], labels.to(device), gates.clamp(0, 1)[layers], reg)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(float(loss.detach()))
                if log_every and step % log_every == 0:
                    print(f"duo step {step}: loss {losses[-1]:.5f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    final = gates.detach().clamp(0, 1)
    params = {"steps": steps, "lr": lr, "reg": reg, "sinks": sinks, "recent": recent, "seed": seed,
              "kv_group": group, "layers": layers, "losses": [round(x, 6) for x in losses],
              "samples": len(samples), "haystack": "NIAH essays (BookSum unavailable)"}
    return HeadScores(final.repeat_interleave(group, dim=1), "duo-attention", model_name(model),
                      "synthetic passkey retrieval", params)
