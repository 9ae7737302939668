"""Image quality proxies that need no weights, and CLIP score with a user-supplied CLIP model.

* ``sharpness``: variance of the 4-neighbour Laplacian ``[[0,1,0],[1,-4,1],[0,1,0]]`` of the grey image
  (ITU-R 601 luma, 0–255 scale), on the valid region (no padding) — OpenCV ``Laplacian(ksize=1).var()`` up to the
  border handling.
* ``colourfulness``: Hasler & Süsstrunk (2003): ``rg = R−G``, ``yb = (R+G)/2 − B``,
  ``M = sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²)`` (population standard deviations, 0–255 scale).
* ``clip_score``: ``100 · max(cos(image_emb, text_emb), 0)`` per pair (torchmetrics' definition).

Images are PIL images, numpy arrays ``[H, W, 3]`` (uint8 0–255, or float 0–1) or tensors ``[3, H, W]`` (0–1).

Example:
    >>> import numpy as np
    >>> img = np.zeros((4, 4, 3), dtype=np.uint8); img[..., 0] = 255  # pure red
    >>> round(colourfulness(img), 3)  # sigma 0, mu = sqrt(255^2 + 127.5^2)
    85.53
"""

from __future__ import annotations

import numpy as np


def to_rgb_array(image) -> np.ndarray:
    """Float64 array ``[H, W, 3]`` on the 0–255 scale."""
    try:
        import torch

        if isinstance(image, torch.Tensor):
            arr = image.detach().float().cpu().numpy()
            if arr.ndim == 3 and arr.shape[0] in (1, 3):
                arr = np.moveaxis(arr, 0, -1)  # [3, H, W] -> [H, W, 3]
            return _scale(arr, float_range=1.0)
    except ImportError:  # pragma: no cover
        pass
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    return _scale(np.asarray(image), float_range=1.0 if np.asarray(image).dtype.kind == "f" else 255.0)


def _scale(arr: np.ndarray, float_range: float) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3] or [3, H, W], got shape {arr.shape}.")
    arr = arr.astype(np.float64)
    return arr * 255.0 if float_range == 1.0 else arr


def sharpness(image) -> float:
    """Variance of the Laplacian of the grey image (higher = sharper)."""
    rgb = to_rgb_array(image)
    grey = rgb @ np.array([0.299, 0.587, 0.114])  # [H, W]
    if min(grey.shape) < 3:
        raise ValueError(f"sharpness needs an image of at least 3x3 pixels, got {grey.shape}.")
    lap = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]
           - 4 * grey[1:-1, 1:-1])  # [H-2, W-2]
    return float(lap.var())


def colourfulness(image) -> float:
    """Hasler–Süsstrunk colourfulness M (0 for grey images)."""
    rgb = to_rgb_array(image)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def clip_score(model, processor, images, texts) -> list[float]:
    """CLIP score per (image, text) pair: ``100 * max(cosine, 0)``; ``model`` is a ``CLIPModel``-like module
    with ``get_image_features`` / ``get_text_features`` and ``processor`` a matching ``CLIPProcessor``."""
    import torch

    if len(images) != len(texts):
        raise ValueError(f"clip_score: {len(images)} images but {len(texts)} texts; pass one text per image.")
    device = next(model.parameters()).device
    inputs = processor(text=list(texts), images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=inputs["pixel_values"].to(device)))  # [N, E]
        txt = _features(model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                                attention_mask=inputs["attention_mask"].to(device)))  # [N, E]
    cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)  # [N]
    return (100 * cos.clamp(min=0)).tolist()


def _features(out):
    """transformers 5 may return a model output instead of a tensor: take its pooled embedding."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        val = getattr(out, name, None)
        if isinstance(val, torch.Tensor):
            return val
    raise TypeError(f"clip_score: cannot read embeddings from {type(out).__name__}.")
