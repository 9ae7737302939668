"""PASTA (Zhang et al., ICLR 2024): steer selected heads toward a user-marked span.

In the target heads every query row gets ``S'_ij = S_ij + log α`` on the *prompt* keys outside the highlighted span
``G`` (``scale_position="exclude"``, the paper's default, α = 0.01). After the softmax this is
``A'_ij = w_j A_ij / Σ_k w_k A_ik`` with ``w_j = α`` off the span. Generated tokens are never down-weighted (as in the
released code). The edit is a key bias ``[B, 1, 1, K]`` (no ``[Q, K]`` tensor), so it runs on the fused ``torch``
backend; spans follow each sample through left padding and KV-cache decoding.

Other modes: ``"include"`` adds ``log α`` on ``G`` itself (use α > 1; the released multi-section hook then also
subtracts ``log α`` from every prompt key, which equals ``"exclude"`` with 1/α — use that instead);
``"generation"`` adds ``log α`` to every prompt key.

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


def pasta_key_bias(span: torch.Tensor, prompt: torch.Tensor, alpha: float, mode: str = "exclude") -> torch.Tensor:
    """Additive key bias ``[B, K]``: ``log α`` where PASTA rescales, 0 elsewhere. span/prompt: bool ``[B, K]``.

    Example:
        >>> span = torch.tensor([[False, True, True, False, False]])
        >>> prompt = torch.tensor([[True, True, True, True, False]])      # the last key was generated
        >>> [round(p, 5) for p in torch.softmax(pasta_key_bias(span, prompt, 0.01), -1)[0].tolist()]
        [0.00331, 0.33113, 0.33113, 0.00331, 0.33113]
    """
    if mode not in MODES:
        raise ValueError(f"pasta: scale_position must be one of {MODES}, got {mode!r}")
    log_alpha = math.log(alpha) if alpha > 0 else float("-inf")
    where = {"exclude": prompt & ~span, "include": span, "generation": prompt}[mode]
    return torch.where(where, log_alpha, 0.0)


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

    def score_bias(self, ctx):
        span = ctx.key_mask(self.span)  # [B, K]
        prompt = ctx.key_mask("prompt")  # [B, K] real prompt tokens
        bias = pasta_key_bias(span, prompt, self.alpha, self.scale_position)  # [B, K]
        return bias.to(ctx.device)[:, None, None, :]  # [B, 1, 1, K]
