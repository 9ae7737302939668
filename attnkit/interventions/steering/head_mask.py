"""Head masking as in the Retrieval-Head paper (Wu et al., 2024; METHODS.md §7 "Masking"): a blocked head gets
all-zero pre-softmax logits, i.e. uniform attention over the keys it may see (a causal average of the values),
not a zeroed output. The released ``needle_in_haystack_with_mask.py`` applies the mask on **decode steps only**
(prefill runs unmasked): that is the default here (``decode_only=True``); ``decode_only=False`` masks prefill too
(uniform over each row's causal keys — never over future keys, unlike the released eager path).

The edit is a per-head factor 0 on the scores (:meth:`query_scale`), so it runs on the fused ``torch`` backend
without materialising attention. Target the blocked heads with ``layers``/``heads`` (``heads`` may be a
``{layer: [heads]}`` dict or a :class:`~attnkit.scores.HeadScores` selection).

Example (a decode step of a masked head attends uniformly to the 3 cached keys + itself):
    >>> import torch, attnkit
    >>> from attnkit.hooks.compat import cache_kwargs, output_cache
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> with attnkit.attach(model, [HeadMask(heads={1: [2]})]) as h, torch.no_grad():
    ...     out = model(torch.tensor([[1, 5, 7]]), use_cache=True)
    ...     with h.capture(layers=[1], heads=[2]) as cap:
    ...         _ = model(torch.tensor([[9]]), **cache_kwargs(model, output_cache(out)))
    >>> cap.last(1)[0, 0, 0].tolist()
    [0.25, 0.25, 0.25, 0.25]
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention


@register_intervention
class HeadMask(Intervention):
    name = "head-mask"
    conformance = {"neutral": None, "active": {"decode_only": False, "heads": {0: [1]}}}
    requires = frozenset({"text_decoder"})
    description = "block heads: zero pre-softmax logits (uniform attention), on decode steps by default"

    def __init__(self, decode_only: bool = True, **target):
        super().__init__(**target)
        if not isinstance(decode_only, bool):
            raise ValueError(f"head-mask: decode_only must be a bool, got {decode_only!r}")
        self.decode_only = decode_only

    def query_scale(self, ctx) -> torch.Tensor:  # -> [H]; the framework applies it to the target heads only
        if self.decode_only and ctx.is_prefill:
            return torch.ones(ctx.num_heads, device=ctx.device)
        return torch.zeros(ctx.num_heads, device=ctx.device)
