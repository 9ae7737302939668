"""Active and dormant heads (Guo et al., arXiv 2410.13835; repo GuoTianYu2000/Active-Dormant-Attention),
METHODS-2.md §10b: the measurements the released code takes to tell a head that dumps its attention on the sink and
barely matters (dormant) from one that attends to content (active), on a given input (domain).

* :func:`head_entropies` — the entropy detector (``MoveAttentionToBOSWithEntropyDetectionHook``): row entropy
  ``R = mean_i H(A_i)/ln(i+1)`` (row 0 scores 0) and column entropy ``C = max_k H(Ã_{·k})/ln(T−k)`` (``Ã_{·k}`` column
  ``k`` normalised over the rows that see it; the last column scores 0); a head is flagged dormant when
  ``R < r_th`` **and** ``C > c_th``. The code has no default thresholds, so they are required.
* :func:`sink_masses` — ``m = Σ_i A_i0 / T`` per head, plus the top-1 / top-2 column masses normalised by ``T − k``.
* :func:`value_norms` — ``‖W_O^{(h)} v_j‖₂`` per layer, head and token (``W_O^{(h)}`` the head's column slice of
  ``o_proj``): the value-state drain is the sink token's small norm.
* :func:`residual_norms` — ``‖h_j^l‖₂`` after every decoder layer: the residual-state peak at the sink.
* :func:`ablation_deltas` — the change in next-token loss when each head is ablated: ``"zero"`` (``zero_out_attn``:
  the head's output is 0) or ``"bos"`` (``move_attn_to_bos``: every row one-hot on the first real token, so the
  output is that token's value). Dormant ≈ 0, active = a clear increase; the cut-off is unverified, so raw deltas
  are returned (a HeadScores).

Example (METHODS-2.md §10b worked example, the matrix of §10a):
    >>> A = torch.tensor([[1, 0, 0, 0], [.7, .3, 0, 0], [.6, .2, .2, 0], [.5, .1, .1, .3]])[None]
    >>> R, C = head_entropies(A)
    >>> round(float(R), 5), round(float(C), 5)
    (0.64725, 0.97528)
    >>> dormant_mask(R, C, r_th=0.7, c_th=0.9).tolist()
    [True]
"""

from __future__ import annotations

import math

import torch

from attnkit.interventions.base import Intervention
from attnkit.interventions.scoring._common import attention_maps, model_name
from attnkit.scores import HeadScores


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def head_entropies(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R [...], C [...])`` of causal maps ``A [..., T, T]`` (see the module docstring)."""
    T = A.shape[-1]
    rows = torch.arange(1, T + 1, device=A.device, dtype=torch.float32)  # 1-based row lengths
    row_h = _entropy(A) / torch.log(rows).clamp_min(1e-30)  # [..., T]
    row_h[..., 0] = 0.0
    cols = A.float().transpose(-1, -2)  # [..., K, Q]
    cols = cols / cols.sum(-1, keepdim=True).clamp_min(1e-30)
    n_rows = torch.arange(T, 0, -1, device=A.device, dtype=torch.float32)  # T - k rows see column k
    col_h = torch.where(n_rows > 1, _entropy(cols) / torch.log(n_rows).clamp_min(1e-30), torch.zeros(()))
    return row_h.mean(-1), col_h.max(-1).values


def dormant_mask(R: torch.Tensor, C: torch.Tensor, *, r_th: float, c_th: float) -> torch.Tensor:
    """Bool: dormant where ``R < r_th`` and ``C > c_th``."""
    return (R < r_th) & (C > c_th)


def dormant_heads(model, inputs: dict, *, r_th: float, c_th: float, data: str = "") -> HeadScores:
    """Entropy detector on every (layer, head) → HeadScores of ``R`` (mean over samples) with ``selected`` = dormant
    (``R < r_th`` and ``C > c_th``, means over samples; ``params["C"]`` holds C). Inputs without padding."""
    maps = attention_maps(model, inputs, queries="all")  # {layer: [B, H, T, T]}
    R, C = zip(*(head_entropies(maps[layer]) for layer in sorted(maps)))
    R, C = torch.stack(R, 1).mean(0), torch.stack(C, 1).mean(0)  # [L, H]
    return HeadScores(R, "dormant-entropy", model_name(model), data,
                      {"r_th": r_th, "c_th": c_th, "C": C.tolist()}, dormant_mask(R, C, r_th=r_th, c_th=c_th))


def sink_masses(A: torch.Tensor) -> dict:
    """``{"sink": Σ_i A_i0 / T, "top1", "top2"}`` per head of maps ``A [..., T, T]``; top-k masses are the k largest
    column means (columns normalised by the ``T − k`` rows that see them)."""
    T = A.shape[-1]
    cols = A.float().sum(-2) / torch.arange(T, 0, -1, device=A.device, dtype=torch.float32)  # [..., T]
    top = cols.topk(min(2, T), dim=-1).values
    return {"sink": A.float()[..., :, 0].sum(-1) / T, "top1": top[..., 0], "top2": top[..., :2].sum(-1)}


def value_norms(model, inputs: dict) -> torch.Tensor:
    """``[L, B, H, T]``: ``‖W_O^{(h)} v_j‖₂`` of every layer, head and token."""
    import attnkit

    reader = _ValueReader()
    with attnkit.attach(model, [reader], backend="torch"), torch.no_grad():
        model(**inputs)
    norms = []
    for layer in sorted(reader.values):
        v = reader.values[layer]  # [B, H, T, D] expanded to query heads
        o_proj = reader.o_proj[layer].float()  # [C, H*D]
        H, D = v.shape[1], v.shape[-1]
        w = o_proj.view(o_proj.shape[0], H, D)  # [C, H, D]
        norms.append(torch.einsum("bhtd,chd->bhtc", v.float(), w).norm(dim=-1))  # [B, H, T]
    return torch.stack(norms)


def residual_norms(model, inputs: dict) -> torch.Tensor:
    """``[L, B, T]``: ``‖h_j^l‖₂`` after every decoder layer (``output_hidden_states``, embeddings excluded)."""
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    return torch.stack([h.float().norm(dim=-1) for h in hidden[1:]])


class _ValueReader(Intervention):
    """Keeps every layer's values (expanded to query heads) and its ``o_proj`` weight; changes nothing."""

    name = "value-reader"

    def __init__(self):
        super().__init__()
        self.values, self.o_proj = {}, {}

    def edit_output(self, out, ctx):
        from attnkit.interventions.kvcache._sparse import expand_kv

        self.values[ctx.layer] = expand_kv(ctx.value, ctx.num_heads).detach().cpu()
        proj = getattr(ctx.module, "o_proj", None) or getattr(ctx.module, "dense", None)
        self.o_proj[ctx.layer] = proj.weight.detach().cpu()
        return out


class HeadAblation(Intervention):
    """Ablate the target heads: ``mode="zero"`` (output 0) or ``"bos"`` (every row one-hot on the sample's first real
    token: the output is that token's value)."""

    name = "head-ablation"

    def __init__(self, mode: str = "zero", **target):
        if mode not in ("zero", "bos"):
            raise ValueError(f"head-ablation: mode must be 'zero' or 'bos', got {mode!r}")
        super().__init__(**target)
        self.mode = mode

    def edit_output(self, out, ctx):
        if self.mode == "zero":
            return torch.zeros_like(out)
        from attnkit.interventions.kvcache._sparse import expand_kv, real_keys

        first = real_keys(ctx).long().argmax(-1)  # [B] first real key
        v = expand_kv(ctx.value, ctx.num_heads)  # [B, H, K, D]
        bos = v[torch.arange(ctx.batch), :, first]  # [B, H, D]
        return bos[:, :, None].expand_as(out).to(out.dtype)


def _loss(model, inputs: dict) -> float:
    with torch.no_grad():
        return float(model(**inputs, labels=inputs["input_ids"]).loss)


def ablation_deltas(model, inputs: dict, *, mode: str = "zero", layers=None, data: str = "") -> HeadScores:
    """Next-token loss change per ablated head (one forward per head) → HeadScores ``[L, H]`` of
    ``loss(ablated) − loss(stock)`` (``params["base_loss"]``); ``layers`` limits the scan (others are NaN)."""
    import attnkit
    from attnkit.hooks.transformers import TransformersAdapter

    text = TransformersAdapter(model).description.component("text")
    base = _loss(model, inputs)
    deltas = torch.full((text.num_layers, text.num_heads), math.nan)
    for layer in (layers if layers is not None else range(text.num_layers)):
        for head in range(text.num_heads):
            with attnkit.attach(model, [HeadAblation(mode, layers=[layer], heads=[head])]):
                deltas[layer, head] = _loss(model, inputs) - base
    return HeadScores(deltas, f"ablation-{mode}", model_name(model), data, {"base_loss": base, "mode": mode})
