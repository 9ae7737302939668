"""AGLA-style assembly of global and local attention (An et al., CVPR 2025, arXiv 2406.12718; repo Lackel/AGLA), with
the augmented view's mask derived from the model's own attention.

AGLA decodes with two views of the image: the original (global features) and an **augmented** view that keeps the
prompt-relevant regions and masks the rest (local, discriminative features), and combines them in the logits
(released ``eval/sample.py``): ``ℓ = ℓ_orig + α·ℓ_aug``, with the adaptive plausibility constraint on the original
(``ℓ(v) = −∞`` where ``ℓ_orig(v) < log β + max ℓ_orig``); defaults ``α = 1``, ``β = 0.5``.

The released augmentation ranks pixels by a GradCAM of an external image-text matching model (BLIP ITM, block 6)
and keeps the top ``ratio = 1 − ITC/2`` fraction. That matcher is not available here, so this version (a flag-free
departure, stated): the relevance of each image token is the model's own attention from the last prompt token at
layer ``layer`` (head mean, read during the main prefill — no extra pass), the top ``keep`` fraction of image tokens
(default 0.8, about the ratio a matching pair's ITC gives) is kept and the pixels of the others are set to ``fill``
(0 in the processor's normalised space = the dataset mean colour; the release blacks them out before normalising).
LLaVA-style ``pixel_values [B, 3, H, W]`` are masked per patch cell; Qwen2-VL's flattened patches per merged token
(rows ``4k … 4k+3``).

The augmented view is a second pass of the whole model (:class:`attnkit.branch.BranchedLogits`, ``runner="model"``)
with its own KV cache, fed every decode step. Greedy decoding takes ``argmax ℓ``; the release samples from
``softmax(ℓ)`` (multinomial), with its greedy line commented out.

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_vlm, vlm_inputs
    >>> model = tiny_vlm("llava"); inputs = vlm_inputs("llava", model, batch=1)       # 16 image tokens (4 x 4)
    >>> agla = AGLA(layer=1, keep=0.5)
    >>> with attnkit.attach(model, [agla]), torch.no_grad():
    ...     out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    >>> agla.last_keep.shape, int(agla.last_keep.sum())
    (torch.Size([1, 16]), 8)
"""

from __future__ import annotations

import math

import torch

from attnkit.branch import BranchedLogits, BranchInputs
from attnkit.interventions.base import register_intervention
from attnkit.interventions.lvlm._image_attention import image_token_grid


def agla_logits(orig: torch.Tensor, augmented: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``ℓ_orig + α·ℓ_aug``, ``−∞`` where ``ℓ_orig < log β + max ℓ_orig`` (fp32 math, ``orig``'s dtype).

    Example:
        >>> agla_logits(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 5.0]), 1.0, 0.3).tolist()
        [2.0, 3.0, -inf]
    """
    o = orig.float()
    out = o + alpha * augmented.float().to(o.device)
    if beta > 0:
        out = out.masked_fill(o < math.log(beta) + o.max(-1, keepdim=True).values, float("-inf"))
    return out.to(orig.dtype)


def keep_top(relevance: torch.Tensor, keep: float) -> torch.Tensor:
    """Bool ``[B, n]``: the ``ceil(keep·n)`` most relevant image tokens per sample (ties: the earlier token).

    Example:
        >>> keep_top(torch.tensor([[0.1, 0.4, 0.3, 0.2]]), 0.5).tolist()
        [[False, True, True, False]]
    """
    n = relevance.shape[-1]
    k = min(n, max(1, math.ceil(keep * n)))
    idx = relevance.float().argsort(dim=-1, descending=True, stable=True)[:, :k]
    return torch.zeros_like(relevance, dtype=torch.bool).scatter_(-1, idx, True)


def mask_pixels(pixel_values: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int], fill: float = 0.0,
                image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """The augmented ``pixel_values``: masked image tokens' pixels set to ``fill``. ``keep`` bool ``[B, n]``.

    LLaVA-style ``[B, 3, H, W]``: token ``(r, c)`` of the ``grid`` covers the matching ``H/rows × W/cols`` cell.
    Qwen2-VL ``[B·n·4, D]`` (``image_grid_thw`` given): merged token ``k`` of image ``b`` is rows ``4k … 4k+3``."""
    out = pixel_values.clone()
    if image_grid_thw is not None:
        per_token = 4
        rows = keep.reshape(-1).repeat_interleave(per_token)  # [B*n*4]
        out[~rows.to(out.device)] = fill
        return out
    rows_n, cols_n = grid
    B, _, H, W = pixel_values.shape
    cell = keep.view(B, 1, rows_n, cols_n).float()
    pix = torch.nn.functional.interpolate(cell, size=(H, W), mode="nearest").bool()  # [B, 1, H, W]
    return torch.where(pix.to(out.device), out, torch.full((), fill, dtype=out.dtype, device=out.device))


@register_intervention
class AGLA(BranchedLogits):
    name = "agla"
    description = "AGLA-style: original + attention-masked augmented view, assembled in the logits"
    requires = frozenset({"causal_lm", "image_tokens"})
    conformance = {"neutral": {"alpha": 0.0, "beta": 0.0}, "active": {"alpha": 1.0, "keep": 0.5, "beta": 0.0},
                   "families": ("llava", "qwen2_vl"),
                   "not_applicable": {"generate": "the augmented view is chosen once from the prompt at the prefill; a "
                                                  "recomputation chooses it again from the grown sequence"},
                   "families_reason": "LLaVA-style pixel grids and Qwen2-VL merged patches are supported"}
    runner = "model"
    mirror = True

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, keep: float = 0.8, layer: int | None = None,
                 fill: float = 0.0, **target):
        if target.get("layers") is not None or target.get("heads") is not None:
            raise ValueError("agla: it combines logits; give the relevance layer as layer=, not layers/heads")
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"agla: keep (fraction of image tokens kept) must be in (0, 1], got {keep}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"agla: beta (plausibility threshold) must be in [0, 1], got {beta}")
        super().__init__(**target)
        self.alpha, self.beta, self.keep, self.layer, self.fill = float(alpha), float(beta), float(keep), layer, fill
        self._capture = None
        #: bool ``[B, n]`` image tokens the last augmented view kept
        self.last_keep: torch.Tensor | None = None

    def install(self, handle) -> list:
        text = handle.description.component("text")
        self._layer = self.layer if self.layer is not None else text.num_layers // 2
        if not 0 <= self._layer < text.num_layers:
            raise ValueError(f"agla: layer {self._layer} does not exist (the text decoder has {text.num_layers})")
        self._image_id = handle.description.image_token_id
        tower = next((m for n, m in handle.model.named_modules() if n.endswith(("vision_tower", "visual"))), None)
        if tower is None:
            raise ValueError(f"agla: {type(handle.model).__name__} has no vision tower attnkit can find "
                             "(LLaVA-style vision_tower, Qwen2-VL visual)")
        self._pixels = self._grid_thw = None
        # generate encodes the images before the first forward (which then gets mm_encoder_outputs): the pixels the
        # augmented view masks are read where the tower receives them
        return super().install(handle) + [handle.hook(tower, self._record_pixels, pre=True, with_kwargs=True,
                                                      always=True)]

    def _record_pixels(self, module, args, kwargs):
        if self._busy:
            return
        pixels = args[0] if args and isinstance(args[0], torch.Tensor) else \
            kwargs.get("pixel_values", kwargs.get("hidden_states"))
        grid = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else kwargs.get("grid_thw")
        self._pixels, self._grid_thw = pixels, grid

    # ---- relevance from the main prefill -------------------------------------------------------------------------
    def on_prefill(self, call: dict) -> None:
        if self._capture is not None:  # a capture left by a forward that raised
            self._capture.stop()
        self._capture = self._handle.capture(layers=[self._layer], queries="last")

    def on_main_done(self, call: dict) -> None:
        if self._capture is not None:
            self._capture.stop()

    def branch_inputs(self, call: dict) -> BranchInputs | None:
        capture, self._capture = self._capture, None
        ids = call["ids"]
        kwargs = {k: v for k, v in call["kwargs"].items() if k not in ("mm_encoder_outputs", "pixel_values")}
        pixels, self._pixels = self._pixels, None
        if ids is None or pixels is None or capture is None or not capture.records or \
                not bool((ids == self._image_id).any()):
            return None  # text only (or a call the capture did not see): nothing to augment
        image = ids == self._image_id  # [B, N]
        counts = image.sum(1)
        if int(counts.min()) == 0 or bool((counts != counts[0]).any()):
            raise ValueError(f"agla: every sample needs one image with the same number of tokens, got {counts.tolist()}")
        row = capture.last(self._layer)[:, :, -1].float().mean(1)  # [B, K] head mean of the last prompt row
        relevance = torch.stack([row[b, image[b].to(row.device)] for b in range(ids.shape[0])])  # [B, n]
        grid_thw = kwargs.get("image_grid_thw", self._grid_thw)
        if grid_thw is not None:
            kwargs["image_grid_thw"] = grid_thw
        grid = image_token_grid(int(counts[0]), grid_thw)
        self.last_keep = keep_top(relevance, self.keep)
        augmented = mask_pixels(pixels, self.last_keep, grid, self.fill, grid_thw)
        mask = call["mask"] if call["mask"] is not None else torch.ones_like(ids)
        return BranchInputs({**kwargs, "input_ids": ids, "attention_mask": mask, "pixel_values": augmented},
                            valid=torch.ones_like(ids, dtype=torch.bool))

    def combine(self, main: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return agla_logits(main, branch, self.alpha, self.beta)
