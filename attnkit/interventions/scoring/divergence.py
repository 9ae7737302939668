"""Vision-aware head divergence (VHD, He et al., ACL 2025; METHODS.md §10): ``‖o_{l,h}(with image) −
o_{l,h}(text only)‖₂`` of each head's attention output at the last prompt position, with the paper's outlier removal
and per-layer selection ``{h : VHD > median_l}`` (torch's lower median, strict ``>``).

Example (METHODS.md worked example):
    >>> import torch
    >>> vhd_select(torch.tensor([[0.1, 0.9, 0.5, 0.3]])).nonzero()[:, 1].tolist()
    [1, 2]
    >>> ta = torch.tensor([[0.0, 10.0, 0.0, 0.0]])     # head 1's output surges without the image: outlier
    >>> vhd_select(torch.tensor([[0.1, 0.9, 0.5, 0.3]]), ta).nonzero()[:, 1].tolist()
    [2, 3]
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention
from attnkit.interventions.scoring._common import model_name
from attnkit.scores import HeadScores


class HeadOutputRecorder(Intervention):
    """Records each layer's per-head attention output at the last query row (changes nothing)."""

    name = "head-output-recorder"

    def __init__(self, **target):
        super().__init__(**target)
        self.outputs: dict[int, torch.Tensor] = {}

    def edit_output(self, out, ctx):  # out [B, H, Q, D]
        if ctx.query_rows is None:
            self.outputs[ctx.layer] = out[:, :, -1].detach().float().cpu()  # [B, H, D]
        return out


def head_outputs(model, inputs: dict, backend: str = "auto") -> torch.Tensor:
    """Per-head outputs at the last position, ``[L, B, H, D]``."""
    import attnkit

    rec = HeadOutputRecorder()
    with attnkit.attach(model, [rec], backend=backend), torch.no_grad():
        model(**inputs)
    return torch.stack([rec.outputs[layer] for layer in sorted(rec.outputs)])


def remove_outliers(vhd: torch.Tensor, ta: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Zero VHD where both ``VHD > μ_l + σ_l`` and ``TA > μ_l + σ_l`` (per layer; population σ by default)."""
    def above(x):
        return x > x.mean(-1, keepdim=True) + x.std(-1, keepdim=True, correction=int(unbiased))

    return torch.where(above(vhd) & above(ta), torch.zeros_like(vhd), vhd)


def vhd_select(vhd: torch.Tensor, ta: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[L, H]``: heads with (outlier-cleaned) VHD strictly above their layer's lower median."""
    cleaned = vhd if ta is None else remove_outliers(vhd, ta)
    return cleaned > cleaned.median(-1, keepdim=True).values


def vision_divergence_scores(model, inputs_with_image: dict, inputs_text_only: dict, outliers: bool = True,
                             data: str = "") -> HeadScores:
    """HeadScores of VHD (mean over the batch), with ``selected`` = the paper's per-layer top half."""
    with_img = head_outputs(model, inputs_with_image)  # [L, B, H, D]
    text = head_outputs(model, inputs_text_only)
    vhd = (with_img - text).norm(dim=-1).mean(1)  # [L, H]
    ta = text.pow(2).sum(-1).mean(1)  # [L, H]
    selected = vhd_select(vhd, ta if outliers else None)
    return HeadScores(vhd, method="vision-divergence", model=model_name(model), data=data,
                      params={"outliers": outliers}, selected=selected)


def drop_image_tokens(inputs: dict, image_token_id: int) -> dict:
    """Text-only version of a VLM batch: image placeholder tokens and pixel inputs removed."""
    ids = inputs["input_ids"]
    keep = ids != image_token_id  # [B, N]
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("drop_image_tokens needs the same number of text tokens in every sample")
    out = {"input_ids": ids[keep].view(ids.shape[0], -1)}
    if "attention_mask" in inputs:
        out["attention_mask"] = inputs["attention_mask"][keep].view(ids.shape[0], -1)
    return out
