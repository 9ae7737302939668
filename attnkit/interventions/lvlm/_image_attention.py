"""Where a vision-language model looks: the attention of one layer's last prompt row over each sample's image
tokens, and the patch grid those tokens form (LLaVA-style square grids, Qwen2-VL's merged ``image_grid_thw``)."""

from __future__ import annotations

import math

import torch


def image_token_grid(n_tokens: int, image_grid_thw: torch.Tensor | None = None, merge: int = 2) -> tuple[int, int]:
    """``(rows, cols)`` of the image tokens: Qwen2-VL ``(h/merge, w/merge)`` from ``image_grid_thw``; otherwise a
    square grid (LLaVA: 24×24 for 576 tokens).

    Example:
        >>> image_token_grid(576), image_token_grid(4, torch.tensor([[1, 4, 4]]))
        ((24, 24), (2, 2))
    """
    if image_grid_thw is not None:
        t, h, w = (int(x) for x in image_grid_thw.reshape(-1, 3)[0])
        return h // merge, w // merge
    side = int(round(math.sqrt(n_tokens)))
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} image tokens do not form a square grid; pass image_grid_thw")
    return side, side


def last_row_image_attention(model, inputs: dict, layer: int, image_token_id: int) -> torch.Tensor:
    """``[B, n_image_tokens]``: layer ``layer``'s attention from the last prompt token to the image tokens, averaged
    over heads (fp32), read with an attnkit capture of the last row (O(K) per head, any backend)."""
    import attnkit

    ids = inputs["input_ids"]
    with attnkit.attach(model, []) as handle, handle.capture(layers=[layer], queries="last") as cap, torch.no_grad():
        model(**inputs)
    row = cap.last(layer)[:, :, -1].float().mean(1)  # [B, K]
    image = ids == image_token_id  # [B, N]
    counts = image.sum(1)
    if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise ValueError(f"every sample needs the same number of image tokens, got {counts.tolist()}")
    return torch.stack([row[b, image[b].to(row.device)] for b in range(ids.shape[0])])  # [B, n]
