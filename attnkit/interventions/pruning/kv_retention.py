"""Per-head KV retention (DuoAttention / RazorAttention deployment): full KV for retrieval heads, sink + window
for every other head.

The decision is per **KV head** (the cache is per KV head): a KV head keeps everything if any of its query heads is
listed as a retrieval head; the query heads of the other KV heads (the *streaming* heads) see only the first
``sinks`` *real* tokens (left padding skipped) and a recent window, at their original positions. The restriction is a
pre-softmax key mask (``score_bias``, fused ``torch`` backend), so it simulates an evicting cache exactly;
:meth:`KVRetention.memory_report` says how much KV memory such a cache saves.

``mask="deploy"`` (default) is DuoAttention's released deployment (``llama_duo_attention_forward_one_way_reordered``
and its static-cache twin): a single-shot prefill (a call with an empty cache) runs **full attention for every
head**, and the streaming caches are cut to sink + the last ``window`` tokens afterwards; a later call (a decode
step, or a chunk of a chunked prefill) lets the streaming heads see the sinks, the ``window`` tokens cached before
the call and the **whole current chunk** (causally). A decode query at position ``i`` therefore sees
``j < sinks`` or ``i − j ≤ window``: ``window + 1`` recent keys counting itself. ``mask="lambda"`` is the paper's
Λ-shaped training mask (``generate_streaming_mask``: ``j < sinks`` or ``i − j < window``) applied to every query row,
prefill included — how DuoAttention's gate optimisation simulates streaming heads, and attnkit's previous
behaviour. Default = deployment because that is what the released code runs at inference and what its results
measure; the training mask changes the prefill of every streaming head.

Decode steps build a ``[B, 1, 1, K]`` bias per layer; ``mask="lambda"`` prefill and chunked-prefill calls build a
``[B, 1, Q, K]`` one (one per call, not per head).

Example (DuoAttention's window: sink 2, recent 3, query at position 9):
    >>> import torch
    >>> real = torch.ones(1, 10, dtype=torch.bool)
    >>> deployed_allowed(real, 1, 2, 3)[0, 0].nonzero().flatten().tolist()      # decode step (released code)
    [0, 1, 6, 7, 8, 9]
    >>> streaming_allowed(real, 1, 2, 3)[0, 0].nonzero().flatten().tolist()     # Λ training mask
    [0, 1, 7, 8, 9]

Attached to a model:
    >>> import attnkit
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


MASKS = ("deploy", "lambda")


def sink_keys(real: torch.Tensor, sinks: int) -> torch.Tensor:
    """Bool ``[B, K]``: the first ``sinks`` real keys of each sample (left padding skipped).

    Example:
        >>> sink_keys(torch.tensor([[False, True, True, True]]), 2).int().tolist()
        [[0, 1, 1, 0]]
    """
    return real & (real.long().cumsum(1) <= sinks)


def streaming_allowed(real: torch.Tensor, q_len: int, sinks: int, window: int) -> torch.Tensor:
    """The Λ training mask: bool ``[B, Q, K]``, sink (first ``sinks`` real keys) or ``i − j < window`` (queries are
    the last ``Q`` of the ``K`` positions). Causality and padding are left to the model's own mask.

    Example (DuoAttention worked example: sink 2, recent 3, query at position 9):
        >>> streaming_allowed(torch.ones(1, 10, dtype=torch.bool), 1, 2, 3)[0, 0].nonzero().flatten().tolist()
        [0, 1, 7, 8, 9]
    """
    k_len = real.shape[1]
    q_pos = torch.arange(k_len - q_len, k_len, device=real.device)[:, None]  # [Q, 1]
    k_pos = torch.arange(k_len, device=real.device)[None, :]  # [1, K]
    recent = (q_pos - k_pos) < window  # [Q, K]
    return sink_keys(real, sinks)[:, None, :] | recent[None]  # [B, Q, K]


def deployed_allowed(real: torch.Tensor, q_len: int, sinks: int, window: int) -> torch.Tensor:
    """DuoAttention's deployed cache for a call on a non-empty cache: bool ``[B, 1, K]``, the sinks, the ``window``
    keys cached before the call's first query and the whole call (the call's queries are the last ``Q`` keys; the
    model's mask keeps it causal). A decode query at ``i`` sees ``i − j ≤ window``.

    Example (a 4-token chunk at positions 8..11 after a prefill of 8, sink 2, recent 3):
        >>> deployed_allowed(torch.ones(1, 12, dtype=torch.bool), 4, 2, 3)[0, 0].nonzero().flatten().tolist()
        [0, 1, 5, 6, 7, 8, 9, 10, 11]
    """
    k_len = real.shape[1]
    first_query = k_len - q_len
    recent = torch.arange(k_len, device=real.device) >= first_query - window  # [K]
    return (sink_keys(real, sinks) | recent[None])[:, None, :]  # [B, 1, K]


@register_intervention
class KVRetention(Intervention):
    name = "kv-retention"
    conformance = {
        "neutral": {"window": 100_000}, "active": {"sinks": 1, "window": 3, "retrieval_heads": {0: [0]}},
        "not_applicable": {"generate": "a KV-cache policy: the evicting cache is the method, recomputation has none "
                                       "(a recomputed prefill runs full attention)"}}
    requires = frozenset({"text_decoder"})
    description = "full KV cache for retrieval heads, sink + window for the others (per KV head)"
    exclusive = "kv-cache"

    def __init__(self, retrieval_heads=None, sinks: int = 4, window: int = 256, mask: str = "deploy", **target):
        if target.get("heads") is not None:
            raise ValueError("kv-retention: give retrieval_heads ({layer: [query heads]}); the other heads stream")
        if mask not in MASKS:
            raise ValueError(f"kv-retention: mask must be one of {MASKS}, got {mask!r}")
        super().__init__(**target)
        self.retrieval_heads = {int(k): sorted(set(v)) for k, v in (retrieval_heads or {}).items()}
        self.sinks, self.window, self.mask = sinks, window, mask
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
        if self.mask == "deploy" and ctx.is_prefill:
            return None  # single-shot prefill: full attention for every head; the cache is cut afterwards
        real = ctx.key_mask("real")  # [B, K]
        if self.mask == "deploy":
            allowed = deployed_allowed(real, ctx.q_len, self.sinks, self.window)  # [B, 1, K]
        else:
            allowed = streaming_allowed(real, ctx.q_len, self.sinks, self.window)  # [B, Q, K]
        zero = torch.zeros((), device=ctx.device)
        return torch.where(allowed.to(ctx.device), zero, float("-inf"))[:, None]  # [B, 1, Q|1, K]

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
