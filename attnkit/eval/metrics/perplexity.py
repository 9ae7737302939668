"""Perplexity: the strided sliding-window standard, and a streaming mode with a bounded, pluggable KV cache.

Standard (``strided_nll``): windows of ``max_length`` tokens advanced by ``stride``; each window scores only the
tokens not scored before, so every token t ≥ 1 is predicted exactly once, with up to ``max_length − 1`` tokens of
context. Totals are sums of token NLLs (never averages of averages).

Streaming (``streaming_nll``): one token per forward call through a KV cache; after every step a *cache policy*
evicts in place and returns the position id of the next query (StreamingLLM's PPL loop, METHODS.md section 3).
A policy is any callable ``policy(model, cache, n_seen) -> int``; an optional ``reset()`` is called per sequence.
Shipped reference policies:

* ``DensePolicy()`` — no eviction; positions are absolute.
* ``SinkWindowPolicy(sink, window, shift_positions=True)`` — keep the first ``sink`` + last ``window`` tokens.
  With ``shift_positions`` (the paper's ``--enable_pos_shift``) positions are cache slots: kept keys are
  re-rotated to their new slots (rotary models, HF ``rotate_half`` convention) and the next query sits at
  ``len(cache)``. Without it, keys keep their original rotation and the query its absolute position
  (streaming-llm's eval default). ``sink=0`` is window-only attention.

A StreamingLLM cache from the interventions package plugs in either as a policy or through ``cache_factory``
(a zero-argument callable returning a ``transformers`` ``Cache``) with ``DensePolicy``-like positions.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> ids = torch.arange(10) % 32
    >>> full, _ = strided_nll(m, ids, max_length=64)
    >>> dense, n = streaming_nll(m, ids, DensePolicy())
    >>> n, abs(full - dense) < 1e-3
    (9, True)
"""

from __future__ import annotations

import math
from typing import Literal

import torch


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(target) for logits ``[T, V]`` and targets ``[T]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    return -logp.gather(-1, targets[:, None]).sum()


@torch.no_grad()
def strided_nll(model, input_ids: torch.Tensor, max_length: int | None = None,
                stride: int | None = None) -> tuple[float, int]:
    """(sum of NLL, number of scored tokens) of a 1-D id tensor with a strided sliding window.

    Targets are scored in chunks of ``stride`` tokens; each chunk is predicted by one forward pass over the window
    of ``max_length`` tokens that ends with it, so every scored token sees at least ``max_length − stride`` tokens
    of context (or everything before it). ``max_length`` defaults to the model's ``max_position_embeddings`` and
    ``stride`` to ``max_length − 1`` (disjoint windows); ``stride`` is capped at ``max_length − 1`` so that the
    first target of a window still has one token of context (HF's recipe with stride == max_length silently skips
    the first token of every window instead).
    """
    ids = input_ids.reshape(-1)  # [N]
    max_length = max_length or model.config.max_position_embeddings
    stride = stride or max_length - 1
    if not 0 < stride <= max_length or max_length < 2:
        raise ValueError(f"perplexity: need 0 < stride ({stride}) <= max_length ({max_length}) and max_length >= 2.")
    step = min(stride, max_length - 1)
    device = next(model.parameters()).device
    total, start = 0.0, 1  # token 0 has no prediction
    while start < len(ids):
        end = min(start + step, len(ids))
        begin = max(0, end - max_length)
        window = ids[begin:end].to(device)  # [W], W <= max_length
        logits = model(input_ids=window[None]).logits[0]  # [W, V]
        first = start - begin  # >= 1: index of the first target inside the window
        total += _token_nll(logits[first - 1:-1], window[first:]).item()
        start = end
    return total, max(len(ids) - 1, 0)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """``exp(nll_sum / n_tokens)`` (inf when nothing was scored)."""
    return math.exp(nll_sum / n_tokens) if n_tokens else float("inf")


# ------------------------------------------------------------------------------------------ cache policies
class DensePolicy:
    """Keep everything; the next query's position is the number of tokens seen."""

    def __call__(self, model, cache, n_seen: int) -> int:
        return n_seen


def _rotary(model):
    inner = getattr(model, "model", model)
    rot = getattr(inner, "rotary_emb", None)
    if rot is None:
        raise ValueError(f"{type(model).__name__} has no `model.rotary_emb`; position shifting needs a rotary "
                         f"model. Use shift_positions=False (eviction only), as for ALiBi models.")
    return rot


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rerotate_keys(model, keys: torch.Tensor, delta: int) -> torch.Tensor:
    """Rotate post-RoPE keys ``[B, H, T, D]`` by ``delta`` positions (negative moves them earlier).

    RoPE rotations compose: R(p + delta) = R(delta) R(p), so one extra rotation re-encodes any key.
    """
    probe = keys.new_zeros(1, dtype=torch.float32)
    cos, sin = _rotary(model)(probe, torch.tensor([[delta]], device=keys.device))  # [1, 1, D]
    cos, sin = cos[0, 0].to(torch.float32), sin[0, 0].to(torch.float32)  # [D]
    k = keys.to(torch.float32)
    return (k * cos + _rotate_half(k) * sin).to(keys.dtype)


def _layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"cache policy: {type(cache).__name__} has no `.layers`; expected a transformers>=5 Cache.")
    return layers


class SinkWindowPolicy:
    """Keep the first ``sink`` and the last ``window`` cached tokens (StreamingLLM); see the module docstring."""

    def __init__(self, sink: int = 4, window: int = 252, shift_positions: bool = True):
        if sink < 0 or window < 1:
            raise ValueError(f"SinkWindowPolicy needs sink >= 0 and window >= 1 (got {sink}, {window}).")
        self.sink, self.window, self.shift_positions = sink, window, shift_positions

    def __call__(self, model, cache, n_seen: int) -> int:
        for layer in _layers(cache):
            length = layer.keys.shape[-2]
            drop = length - self.sink - self.window
            if drop <= 0:
                continue
            keep = torch.cat([torch.arange(self.sink), torch.arange(length - self.window, length)])
            keep = keep.to(layer.keys.device)
            keys = layer.keys.index_select(-2, keep)  # [B, Hkv, S+W, D]
            if self.shift_positions:
                recent = rerotate_keys(model, keys[..., self.sink:, :], -drop)
                keys = torch.cat([keys[..., :self.sink, :], recent], dim=-2)
            layer.keys = keys
            layer.values = layer.values.index_select(-2, keep)
        if self.shift_positions:
            return _layers(cache)[0].keys.shape[-2]
        return n_seen

    def __repr__(self) -> str:
        return f"SinkWindowPolicy(sink={self.sink}, window={self.window}, shift_positions={self.shift_positions})"


@torch.no_grad()
def streaming_nll(model, input_ids: torch.Tensor, policy=None, cache_factory=None,
                  return_steps: bool = False):
    """Token-by-token NLL through a KV cache managed by ``policy`` (default dense).

    Returns ``(nll_sum, n_scored)`` or, with ``return_steps``, also the per-step NLL list.
    """
    from transformers import DynamicCache

    from attnkit.hooks.compat import cache_kwargs, output_cache

    policy = policy or DensePolicy()
    if hasattr(policy, "reset"):
        policy.reset()
    ids = input_ids.reshape(-1)  # [N]
    device = next(model.parameters()).device
    cache = cache_factory() if cache_factory else DynamicCache()
    position, steps = 0, []
    for t in range(len(ids) - 1):
        out = model(input_ids=ids[t:t + 1][None].to(device), **cache_kwargs(model, cache),
                    position_ids=torch.tensor([[position]], device=device))
        cache = output_cache(out)
        steps.append(_token_nll(out.logits[0, -1:], ids[t + 1:t + 2].to(device)).item())
        position = policy(model, cache, t + 1)
    total = float(sum(steps))
    return (total, len(steps), steps) if return_steps else (total, len(steps))


def wikitext_blocks(tokenizer, split: str = "test", block_tokens: int = 1024, path=None) -> list:
    """wikitext-2 raw text tokenized once and cut into consecutive blocks of ``block_tokens`` ids (1-D tensors).

    Blocks are the paired units of the runner (and of its bootstrap); the last partial block is dropped.
    """
    from pathlib import Path

    from attnkit.data import data_path

    path = Path(path) if path else data_path("wikitext-2", f"{split}.txt", must_exist=True)
    ids = torch.tensor(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    return [ids[i:i + block_tokens] for i in range(0, len(ids) - block_tokens + 1, block_tokens)]


# ------------------------------------------------------------------------------------------ task
from attnkit.eval.params import Param  # noqa: E402
from attnkit.eval.task import Task  # noqa: E402


def make_policy(spec, **kw):
    """``"dense"``, ``"sink_window"`` (kwargs sink/window/shift_positions) or ``"module:factory"`` (called with kw)."""
    if spec in (None, "dense"):
        return DensePolicy()
    if spec == "sink_window":
        return SinkWindowPolicy(**kw)
    if isinstance(spec, str) and ":" in spec:
        import importlib

        module, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module), attr)(**kw)
    raise ValueError(f"cache policy {spec!r} unknown; use 'dense', 'sink_window' or 'package.module:factory'.")


class PerplexityTask(Task):
    """wikitext-2 perplexity over blocks of ``block_tokens``; ``mode: strided`` (``max_length``, ``stride``) or
    ``mode: streaming`` (``policy``, ``sink``, ``window``, ``shift_positions``); see ``params_spec``."""

    metrics = ("ppl", "nll_per_token")
    higher_is_better = {"ppl": False, "nll_per_token": False}
    params_spec = {
        "mode": Param(Literal["strided", "streaming"], "strided", "sliding window or token-by-token bounded cache"),
        "split": Param(str, "test", "wikitext-2 split file (test, valid)"),
        "block_tokens": Param(int, 1024, "tokens per paired block"),
        "path": Param(str | None, None, "a raw text file instead of wikitext-2/<split>.txt"),
        "max_length": Param(int | None, None, "strided: window length (default: the whole block)"),
        "stride": Param(int | None, None, "strided: step between windows"),
        "policy": Param(str, "sink_window", "streaming: dense, sink_window or package.module:factory"),
        "sink": Param(int | None, None, "streaming: sink tokens kept (policy default when unset)"),
        "window": Param(int | None, None, "streaming: recent tokens kept (policy default when unset)"),
        "shift_positions": Param(bool | None, None, "streaming: positions as cache slots (policy default)"),
    }

    def required_files(self) -> list:
        from pathlib import Path

        from attnkit.data import data_path

        return [Path(self.params.get("path") or data_path("wikitext-2", f"{self.params.get('split', 'test')}.txt"))]

    def __init__(self, name, **params):
        super().__init__(name, **params)
        self._blocks = None

    def _ensure_blocks(self, tokenizer):
        if self._blocks is None:
            self._blocks = wikitext_blocks(tokenizer, self.params.get("split", "test"),
                                           self.params.get("block_tokens", 1024), self.params.get("path"))
        return self._blocks

    def examples(self, tokenizer=None) -> list[dict]:
        if tokenizer is None:
            raise ValueError("PerplexityTask.examples needs the tokenizer (blocks are in model tokens).")
        return [{"id": str(i), "block": i} for i in range(len(self._ensure_blocks(tokenizer)))]

    def run_example(self, model, tokenizer, example: dict) -> dict:
        ids = self._ensure_blocks(tokenizer)[example["block"]]
        p = self.params
        if p.get("mode", "strided") == "streaming":
            kw = {k: p[k] for k in ("sink", "window", "shift_positions") if p.get(k) is not None}
            nll, n = streaming_nll(model, ids, make_policy(p.get("policy", "sink_window"), **kw))
        else:
            nll, n = strided_nll(model, ids, p.get("max_length"), p.get("stride"))
        return {"nll": nll, "n_tokens": n}

    def aggregate(self, records) -> dict:
        nll = sum(r["nll"] for r in records)
        n = sum(r["n_tokens"] for r in records)
        return {"ppl": perplexity(nll, n), "nll_per_token": nll / n if n else float("inf")}
