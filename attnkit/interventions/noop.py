"""``noop``: touches every hook without changing anything — the parity check for the whole pipeline.

Each hook returns its neutral element (scale 1, bias 0, factors 1, probabilities and outputs unchanged), so a model
with ``noop`` attached must reproduce the stock outputs on every backend.

Example:
    >>> Noop(hooks=("edit_output",)).capabilities()
    {'edit_output'}
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import HOOKS, Intervention, register_intervention


@register_intervention
class Noop(Intervention):
    name = "noop"
    conformance = {"neutral": {"hooks": ("query_scale", "edit_output")}, "active": {"hooks": ("query_scale", "edit_output")}}
    description = "identity intervention used to check that attaching changes nothing"

    def __init__(self, hooks=("edit_output",), **target):
        super().__init__(**target)
        unknown = set(hooks) - set(HOOKS)
        if unknown:
            raise ValueError(f"noop: unknown hook(s) {sorted(unknown)}; choose from {HOOKS}")
        self.hooks = tuple(hooks)

    def capabilities(self) -> set[str]:
        return set(self.hooks)

    def key_groups(self):
        return ("text",)  # a span that exists for transformers and diffusers models alike

    def query_scale(self, ctx):
        return torch.ones(ctx.num_heads, device=ctx.device)

    def score_bias(self, ctx):
        return torch.zeros(1, 1, 1, ctx.k_len, device=ctx.device)

    def edit_scores(self, scores, ctx):
        return scores

    def group_factors(self, mass, ctx):
        return torch.ones_like(mass)

    def edit_probs(self, probs, ctx):
        return probs

    def edit_output(self, out, ctx):
        return out
