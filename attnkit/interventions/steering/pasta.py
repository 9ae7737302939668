"""PASTA (Zhang et al., ICLR 2024): steer selected heads toward a user-marked span.

In the target heads every query row gets ``S'_ij = S_ij + log α`` on the *prompt* keys outside the highlighted span
``G`` (``scale_position="exclude"``, the paper's default, α = 0.01). After the softmax this is
``A'_ij = w_j A_ij / Σ_k w_k A_ik`` with ``w_j = α`` off the span. Generated tokens are never down-weighted (as in the
released code). The edit is a key bias ``[B, 1, 1, K]`` (no ``[Q, K]`` tensor), so it runs on the fused ``torch``
backend; spans follow each sample through left padding and KV-cache decoding.

Several highlighted ranges (``handle.set_span("emphasis", [[(a, b), (c, d)], …])``) are **sections**, and the bias
applies per section, as the released ``edit_multisection_attention`` hook does (it is the hook ``apply_steering``
always installs): for each section, ``"exclude"`` adds ``log α`` to every prompt key outside that section. A prompt key
inside ``c_j`` of the sample's ``S`` sections therefore gets ``(S − c_j)·log α``: the sections keep their weight
relative to each other, the rest of the prompt gets ``α^S`` and generated keys (never rescaled) gain weight with every
section. One section gives exactly the single-span rule above. Sections are the ranges as given (overlapping ranges
count twice where they overlap); a span given as a bool mask has one section per run of consecutive tokens.

Other modes, per section as in the released hook: ``"include"`` adds ``log α`` on each section and then subtracts
``log α`` once from every prompt key, i.e. ``(c_j − 1)·log α`` (meaningful with α > 1; with one section it equals
``"exclude"`` with 1/α); ``"generation"`` adds ``log α`` to every prompt key once per section (``S·log α``).

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama"); ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    >>> with attnkit.attach(model, [Pasta(alpha=0.01, layers=[1], heads=[0, 2])]) as handle:
    ...     handle.set_span("emphasis", [[(2, 4)]])          # tokens 2..3 are the instruction
    ...     steered = model(ids).logits
    >>> steered.shape
    torch.Size([1, 6, 128])
"""

from __future__ import annotations

import math

import torch

from attnkit.interventions.base import Intervention, register_intervention

MODES = ("exclude", "include", "generation")


def pasta_key_bias(span: torch.Tensor, prompt: torch.Tensor, alpha: float, mode: str = "exclude",
                   sections: torch.Tensor | None = None) -> torch.Tensor:
    """Additive key bias ``[B, K]``, the released multi-section hook: ``k_j·log α`` with ``k_j`` how many times the
    hook rescales key j. span: bool ``[B, K]`` or long section counts ``c_j``; prompt: bool ``[B, K]``; sections:
    long ``[B]`` sections per sample (default: one).

    Example (METHODS.md §9: one section, then the same row with a second section on key 3):
        >>> span = torch.tensor([[False, True, True, False, False]])
        >>> prompt = torch.tensor([[True, True, True, True, False]])      # the last key was generated
        >>> [round(p, 5) for p in torch.softmax(pasta_key_bias(span, prompt, 0.01), -1)[0].tolist()]
        [0.00331, 0.33113, 0.33113, 0.00331, 0.33113]
        >>> two = torch.tensor([[0, 1, 1, 1, 0]])                        # sections {1, 2} and {3}
        >>> (pasta_key_bias(two, prompt, 0.01, sections=torch.tensor([2])) / math.log(0.01)).abs().tolist()
        [[2.0, 1.0, 1.0, 1.0, 0.0]]
    """
    if mode not in MODES:
        raise ValueError(f"pasta: scale_position must be one of {MODES}, got {mode!r}")
    counts = span.long()  # [B, K] sections containing each key
    total = torch.ones(span.shape[0], 1, dtype=torch.long) if sections is None else sections.view(-1, 1).long()
    total = total.to(counts.device)
    times = {"exclude": total - counts, "include": counts - 1, "generation": total.expand_as(counts)}[mode]
    times = torch.where(prompt, times, torch.zeros_like(times)).float()  # [B, K] generated keys: never rescaled
    log_alpha = math.log(alpha) if alpha > 0 else float("-inf")
    return torch.where(times != 0, times * log_alpha, torch.zeros_like(times))  # (0·(−∞) would be NaN)


def section_counts(spec, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts [B, length] long, sections [B] long)`` from a span as set on the handle: per-sample ``[(start, end),
    …]`` ranges (each range one section) or a bool ``[B, length]`` mask (each run of consecutive tokens one section).

    Example:
        >>> counts, n = section_counts([[(1, 3), (2, 4)], []], batch=2, length=5)
        >>> counts.tolist(), n.tolist()
        ([[0, 1, 2, 1, 0], [0, 0, 0, 0, 0]], [2, 0])
        >>> section_counts(torch.tensor([[True, True, False, True, False]]), 1, 5)[1].tolist()
        [2]
    """
    if isinstance(spec, torch.Tensor):
        mask = spec.to(torch.bool).cpu()  # [B, N]
        starts = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0))  # [B, N] first token of each run
        return mask.long(), starts.sum(1)
    counts = torch.zeros(batch, length, dtype=torch.long)
    for b, ranges in enumerate(spec):
        for start, end in ranges:
            counts[b, start:end] += 1
    return counts, torch.tensor([len(r) for r in spec], dtype=torch.long)


@register_intervention
class Pasta(Intervention):
    name = "pasta"
    conformance = {"neutral": {"alpha": 1.0}, "active": {"alpha": 0.01},
                   "not_applicable": {"generate": "steers the prompt's keys (as the released hook does): generated "
                                                  "tokens are not prompt tokens, but a recomputation sees them as prompt"}}
    requires = frozenset({"text_decoder", "span:emphasis"})
    description = "PASTA: down-weight attention to prompt tokens outside the user span by alpha in chosen heads"

    def __init__(self, alpha: float = 0.01, span: str = "emphasis", scale_position: str = "exclude", **target):
        if alpha < 0:
            raise ValueError(f"pasta: alpha must be ≥ 0, got {alpha}")
        if scale_position not in MODES:
            raise ValueError(f"pasta: scale_position must be one of {MODES}, got {scale_position!r}")
        super().__init__(**target)
        self.alpha, self.span, self.scale_position = alpha, span, scale_position
        self._sections: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (sequence id, counts [B, T0], [B])

    def setup(self, model) -> None:
        self._sections = None  # sequence ids restart with every attachment

    def _section_counts(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts [B, T] over all tracked positions, sections [B])`` for this sequence (built at its prefill)."""
        tracker = ctx.tracker
        span = tracker.mask(self.span)  # [B, T] (raises a clear error when the span was never set)
        if self._sections is None or self._sections[0] != tracker.sequence_id:
            spec = tracker.user_spans.get(self.span)
            counts, sections = section_counts(spec if spec is not None else span, span.shape[0], span.shape[1])
            self._sections = (tracker.sequence_id, counts, sections)
        _, counts, sections = self._sections
        if counts.shape[0] != span.shape[0] or counts.shape[1] > span.shape[1] or \
                not torch.equal(counts.bool(), span[:, : counts.shape[1]]):
            counts, sections = section_counts(span, span.shape[0], span.shape[1])  # the cache moved: runs of the mask
        return torch.nn.functional.pad(counts, (0, span.shape[1] - counts.shape[1])), sections  # [B, T], [B]

    def score_bias(self, ctx):
        return ctx.per_forward((self, "key_bias"), lambda: self._key_bias(ctx))  # the same for every layer

    def _key_bias(self, ctx):
        counts, sections = self._section_counts(ctx)
        span = ctx.keys_of(counts)  # [B, K] sections containing each key
        prompt = ctx.key_mask("prompt").cpu()  # [B, K] real prompt tokens
        bias = pasta_key_bias(span, prompt, self.alpha, self.scale_position, sections)  # [B, K]
        return bias.to(ctx.device)[:, None, None, :]  # [B, 1, 1, K]
