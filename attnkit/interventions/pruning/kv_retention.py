"""Per-head KV retention (DuoAttention / RazorAttention deployment): full KV for retrieval heads, sink + window
for every other head.

The decision is per **KV head** (the cache is per KV head): a KV head keeps everything if any of its query heads is
listed as a retrieval head; the query heads of the other KV heads see only the first ``sinks`` *real* tokens (left
padding skipped) and the last ``window`` positions (key j visible to query i iff ``i − j < window``), at their
original positions. The restriction is a pre-softmax key mask (``score_bias``, fused ``torch`` backend), so it
simulates an evicting cache exactly; :meth:`KVRetention.memory_report` says how much KV memory such a cache saves.
Prefill builds a ``[B, 1, Q, K]`` bias per layer (one per call, not per head); decode steps a ``[B, 1, 1, K]`` one.

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")         # 2 layers, 4 query heads on 2 KV heads
    >>> kv = KVRetention(retrieval_heads={0: [0], 1: [3]}, sinks=2, window=3)
    >>> with attnkit.attach(model, [kv]):
    ...     _ = model(torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 21]]))
    >>> kv.memory_report(seq_len=1000)["saved_fraction"]
    0.4975
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.targets import Target, parse_layers


def streaming_allowed(real: torch.Tensor, q_len: int, sinks: int, window: int) -> torch.Tensor:
    """Bool ``[B, Q, K]``: sink (first ``sinks`` real keys) or within ``window`` of the query (queries are the last
    ``Q`` of the ``K`` positions). Causality and padding are left to the model's own mask.

    Example (DuoAttention worked example: sink 2, recent 3, query at position 9):
        >>> streaming_allowed(torch.ones(1, 10, dtype=torch.bool), 1, 2, 3)[0, 0].nonzero().flatten().tolist()
        [0, 1, 7, 8, 9]
    """
    k_len = real.shape[1]
    sink = real & (real.long().cumsum(1) <= sinks)  # [B, K]
    q_pos = torch.arange(k_len - q_len, k_len, device=real.device)[:, None]  # [Q, 1]
    k_pos = torch.arange(k_len, device=real.device)[None, :]  # [1, K]
    recent = (q_pos - k_pos) < window  # [Q, K]
    return sink[:, None, :] | recent[None]  # [B, Q, K]


@register_intervention
class KVRetention(Intervention):
    name = "kv-retention"
    conformance = {
        "neutral": {"window": 100_000}, "active": {"sinks": 1, "window": 3, "retrieval_heads": {0: [0]}},
        "not_applicable": {"generate": "a KV-cache policy: the evicting cache is the method, recomputation has none"}}
    requires = frozenset({"text_decoder"})
    description = "full KV cache for retrieval heads, sink + window for the others (per KV head)"
    exclusive = "kv-cache"

    def __init__(self, retrieval_heads=None, sinks: int = 4, window: int = 256, **target):
        if target.get("heads") is not None:
            raise ValueError("kv-retention: give retrieval_heads ({layer: [query heads]}); the other heads stream")
        super().__init__(**target)
        self.retrieval_heads = {int(k): sorted(set(v)) for k, v in (retrieval_heads or {}).items()}
        self.sinks, self.window = sinks, window
        self._info: dict = {}

    def setup(self, model) -> None:
        text = model.component("text")
        n_layers, n_heads, n_kv = text.num_layers, text.num_heads, text.num_kv_heads
        config = model.text_config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        group = n_heads // n_kv
        layers = parse_layers(self.target.layers, n_layers)
        streaming: dict[int, list[int]] = {}
        for layer in layers:
            full_kv = {h // group for h in self.retrieval_heads.get(layer, [])}
            heads = [h for h in range(n_heads) if h // group not in full_kv]
            if heads:
                streaming[layer] = heads
        if not streaming:
            raise ValueError("kv-retention: every KV head of the targeted layers is a retrieval head; nothing streams")
        self.target = Target(layers=sorted(streaming), heads=streaming, modules=self.target.modules)
        self._info = dict(layers=n_layers, kv_heads=n_kv, group=group, head_dim=head_dim, streaming=streaming)

    def score_bias(self, ctx):
        real = ctx.key_mask("real")  # [B, K]
        allowed = streaming_allowed(real, ctx.q_len, self.sinks, self.window)  # [B, Q, K]
        zero = torch.zeros((), device=ctx.device)
        return torch.where(allowed.to(ctx.device), zero, float("-inf"))[:, None]  # [B, 1, Q, K]

    def memory_report(self, seq_len: int, batch: int = 1, bytes_per_value: int = 2) -> dict:
        """KV memory of a full cache vs an evicting cache under this policy, for ``seq_len`` cached tokens."""
        info = self._info
        if not info:
            raise RuntimeError("kv-retention: attach it to a model first (the report needs the model's shape)")
        per_token = 2 * info["head_dim"] * bytes_per_value * batch  # K and V of one KV head
        full = info["layers"] * info["kv_heads"] * seq_len * per_token
        streaming_kv = sum(len({h // info["group"] for h in heads}) for heads in info["streaming"].values())
        kept_len = min(seq_len, self.sinks + self.window)
        kept = full - streaming_kv * (seq_len - kept_len) * per_token
        return {"full_bytes": full, "kept_bytes": kept, "saved_fraction": round(1 - kept / full, 4),
                "streaming_kv_heads": streaming_kv, "total_kv_heads": info["layers"] * info["kv_heads"]}
