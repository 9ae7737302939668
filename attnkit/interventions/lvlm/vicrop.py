"""ViCrop — MLLMs Know Where to Look: Training-free Perception of Small Visual Details (Zhang et al., ICLR 2025;
repo saccharomycetes/mllms_know), METHODS-2.md §4: relative attention map → crop box → answer again with the
original image **and** the crop.

Pipeline (:func:`vicrop`, the released ``rel_att`` method):

1. the original answer: greedy generation on the question (``max_new_tokens=20``);
2. the map: layer ``ℓ*``'s attention from the last prompt token to the image tokens, head mean, for the question
   (``a^q``) and for the general prompt "Write a general description of the image." (``a^g``); ``r = a^q / a^g``
   reshaped to the patch grid (24×24 for LLaVA-1.5; ``(grid_h/2, grid_w/2)`` for Qwen2-VL). No epsilon in the code
   (``eps=None``); ``eps=1e-12`` guards a zero ``a^g``. ``ℓ*``: 14 for LLaVA-1.5-7B, 22 for Qwen2.5-VL-3B
   (:data:`VICROP_LAYERS`; the README invites other layers);
3. the box (:func:`crop_box`, §4.4): for ratios ``1, 1.2, …, 2`` a window of ``s·r`` pixels in map cells, the first
   maximum window (x outer, y inner, strict ``>``), its contrast with the ≤4 edge-adjacent windows per cell; the best
   ratio wins, **ties go to the smaller ratio**; a window covering the whole map returns the full image at ``r = 1``
   and is skipped otherwise; the centre is clamped so the box fits;
4. the final answer: greedy generation with both images, original then crop, and the full question.

``high_res=True`` splits a large image into ``v = ceil(H/1024)`` rows and ``u = max(1, int(v·W/H))`` columns of tiles
(the code's ``u`` is 0 for tall images and crashes), computes a map per tile and stitches them before the box.

The model is reached through ``build_inputs(images, question) -> inputs`` (a processor wrapper with the model's
prompt template; it must accept one or two images) and an optional ``decode(ids) -> str``. The ``grad_att`` and
``pure_grad`` maps are not implemented (they need autograd through the attention probabilities).

Example (METHODS-2.md §4.5, the sharp peak):
    >>> import numpy as np
    >>> M = np.array([[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 9, 0], [0, 0, 0, 0]], dtype=float)
    >>> crop_box(M, (400, 400), 100)
    (200, 200, 300, 300)
    >>> relative_map(torch.tensor([0.02, 0.01, 0.04, 0.03]), torch.tensor([0.04, 0.005, 0.01, 0.03])).tolist()
    [0.5, 2.0, 4.0, 1.0]
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attnkit.interventions.lvlm._image_attention import image_token_grid, last_row_image_attention

RATIOS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
GENERAL_QUESTION = "Write a general description of the image."
#: the released attention layers (indices into ``outputs.attentions``)
VICROP_LAYERS = {"llava-1.5-7b": 14, "qwen2.5-vl-3b": 22}
#: the model's input side ``s`` in pixels
INPUT_SIDES = {"llava-1.5": 336, "qwen2.5-vl": 224, "instructblip": 224}


def relative_map(att_question: torch.Tensor, att_general: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """``a^q / a^g`` (fp32); ``eps`` is added to the denominator when given (the code has none)."""
    general = att_general.float() + (eps or 0.0)
    return att_question.float() / general


def _window_sums(M: np.ndarray, bx: int, by: int) -> np.ndarray:
    """``S[y, x]`` = sum of the ``by × bx`` window whose top-left cell is ``(x, y)``."""
    h, w = M.shape
    c = np.zeros((h + 1, w + 1))
    c[1:, 1:] = M.cumsum(0).cumsum(1)
    return c[by:, bx:] - c[:h - by + 1, bx:] - c[by:, :w - bx + 1] + c[:h - by + 1, :w - bx + 1]


def crop_box(M: np.ndarray, image_size: tuple[int, int], s: int, ratios=RATIOS) -> tuple[int, int, int, int]:
    """The released box rule (see the module docstring) → ``(left, top, right, bottom)`` in pixels.
    ``M`` ``[h, w]`` map, ``image_size = (W, H)``, ``s`` the model's input side.

    Example (§4.5 tie: every ratio has contrast 1.5, the smallest wins):
        >>> M = np.array([[1, 1, 1, 1], [1, 4, 4, 1], [1, 4, 4, 1], [1, 1, 1, 1]], dtype=float)
        >>> crop_box(M, (400, 400), 100)
        (100, 100, 200, 200)
    """
    M = np.asarray(M, dtype=np.float64)
    h, w = M.shape
    W, H = image_size
    cw, ch = W / w, H / h
    best = None  # (diff, ratio, x, y, bx, by)
    for r in ratios:
        bx, by = min(int(s * r / cw), w), min(int(s * r / ch), h)
        bx, by = max(bx, 1), max(by, 1)
        if bx >= w and by >= h:
            if r == ratios[0]:
                return 0, 0, W, H
            continue
        sums = _window_sums(M, bx, by)  # [h-by+1, w-bx+1]
        top, pos = -math.inf, (0, 0)
        for x in range(sums.shape[1]):
            for y in range(sums.shape[0]):
                if sums[y, x] > top:
                    top, pos = sums[y, x], (x, y)
        x, y = pos
        near = [sums[yy, xx] for xx, yy in ((x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1))
                if 0 <= xx < sums.shape[1] and 0 <= yy < sums.shape[0]]
        diff = (top - (sum(near) / len(near) if near else 0.0)) / (bx * by)
        if best is None or diff > best[0]:
            best = (diff, r, x, y, bx, by)
    if best is None:
        return 0, 0, W, H
    _, r, x, y, bx, by = best
    side = int(s * r)
    half = side // 2
    xc, yc = int(x * cw + cw * bx / 2), int(y * ch + ch * by / 2)
    xc, yc = min(max(xc, half), W - half), min(max(yc, half), H - half)
    return max(0, xc - half), max(0, yc - half), min(W, xc + half), min(H, yc + half)


def tile_grid(width: int, height: int, tile: int = 1024) -> tuple[int, int]:
    """High-res split: ``(rows v, cols u)`` with ``v = ceil(H/tile)``, ``u = max(1, int(v·W/H))``.

    Example:
        >>> tile_grid(3000, 2000), tile_grid(500, 3000)
        ((2, 3), (3, 1))
    """
    v = max(1, math.ceil(height / tile))
    return v, max(1, int(v * width / height))


def attention_map(model, build_inputs, image, question: str, *, layer: int, image_token_id: int,
                  general_question: str = GENERAL_QUESTION, eps: float | None = None) -> np.ndarray:
    """The rel-att map ``[rows, cols]`` of one image (numpy, fp64)."""
    q_inputs, g_inputs = build_inputs([image], question), build_inputs([image], general_question)
    a_q = last_row_image_attention(model, q_inputs, layer, image_token_id)[0]  # [n]
    a_g = last_row_image_attention(model, g_inputs, layer, image_token_id)[0]
    rows, cols = image_token_grid(a_q.numel(), q_inputs.get("image_grid_thw"))
    return relative_map(a_q, a_g, eps).view(rows, cols).double().numpy()


def _generate(model, inputs: dict, max_new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:]


def vicrop(model, build_inputs, image, question: str, *, layer: int, side: int, image_token_id: int | None = None,
           general_question: str = GENERAL_QUESTION, eps: float | None = None, high_res: bool = False,
           max_new_tokens: int = 20, decode=None) -> dict:
    """Run ViCrop on one PIL ``image`` → ``{"original", "answer", "box", "map", "crop"}`` (answers as token ids, or
    text with ``decode``). ``side`` is the model's input side ``s`` (:data:`INPUT_SIDES`)."""
    if image_token_id is None:
        image_token_id = getattr(getattr(model, "config", None), "image_token_id", None)
    if image_token_id is None:
        raise ValueError("vicrop needs the model's image token id (config.image_token_id); pass image_token_id")
    original = _generate(model, build_inputs([image], question), max_new_tokens)
    W, H = image.size
    kwargs = dict(layer=layer, image_token_id=image_token_id, general_question=general_question, eps=eps)
    if high_res and (W > 1024 or H > 1024):
        v, u = tile_grid(W, H)
        tw, th = W // u, H // v
        maps = [[attention_map(model, build_inputs, image.crop((i * tw, j * th, (i + 1) * tw, (j + 1) * th)),
                               question, **kwargs) for i in range(u)] for j in range(v)]
        M = np.block(maps)
    else:
        M = attention_map(model, build_inputs, image, question, **kwargs)
    box = crop_box(M, (W, H), side)
    crop = image.crop(box)
    answer = _generate(model, build_inputs([image, crop], question), max_new_tokens)
    if decode is not None:
        original, answer = decode(original), decode(answer)
    return {"original": original, "answer": answer, "box": box, "map": M, "crop": crop}
