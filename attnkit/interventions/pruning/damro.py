"""DAMRO (Gong et al., EMNLP 2024): contrastive decoding against the vision encoder's outlier tokens.

Rule (METHODS.md §6, released code; every step per sample):

1. *Outliers.* Forward hooks on ``q_proj`` / ``k_proj`` of ViT layer ``vision_feature_layer`` keep the raw
   projections (before the head split and before HF's scaling). The [CLS] row of **one merged head**,
   ``softmax(q_cls · Kᵀ · C^{-1/2})`` with ``C`` the vision hidden size, ranks the patches; the top ``k`` are the
   outlier tokens (:class:`~attnkit.interventions.pruning._vision_cls.ClsAttention` with ``merged=True``).
   ``cls_rule="head_mean"`` uses the per-head mean instead (a comparison flag; it ranks patches differently).
2. *Contrastive branch.* A second LLM pass on the same prompt whose image part is **only those k projected
   tokens**, in top-k order (score-descending; ``order="raster"`` re-sorts them), re-indexed (positions
   ``0..n'−1`` over the shorter sequence, as LLaVA numbers any prompt). It has its own KV cache and runs at every
   decode step.
3. *Logits.* ``ℓ = (1+α)·ℓ_orig − α·ℓ_outlier``, then the adaptive plausibility constraint sets ``ℓ(v) = −∞``
   where ``ℓ_orig(v) < log β + max ℓ_orig`` (⇔ ``p_orig(v) < β·max p_orig``): :func:`damro_logits`.

How it runs: after ``attnkit.attach(model, [Damro(...)])`` a normal ``model(...)`` / ``model.generate(...)`` returns
the combined logits. The second pass is :class:`attnkit.branch.BranchedLogits` (shared with other two-pass methods):
the projected image embeddings are read from the decoder's ``inputs_embeds`` at prefill (the image placeholders
already hold the projected patches), the outlier rows come from the vision hooks, and after the original forward the
outlier-only branch runs on the **stock** decoder (attnkit's other edits are switched off inside it) with its own
cache. A call with an empty main cache is a prefill (a new branch sequence; this also makes ``use_cache=False``
generation recompute both branches from scratch at every step); a call on a non-empty cache is a decode step of the
current branch. Beam search and ``num_return_sequences`` work (each expanded row takes its image's outliers; the
branch cache follows the main cache's ``reorder_cache`` calls). Returned logit positions that lie after the image
(the text suffix both branches share, aligned from the right under left padding) get the combined logits; earlier
positions (prefix, image) are returned unchanged. Inputs without image tokens are left unchanged.

Sampling: greedy decoding takes ``argmax ℓ`` exactly as the released code. The code samples from ``softmax(ℓ)``
directly, bypassing temperature / top-k / top-p; pass :meth:`Damro.sampling_kwargs` to ``generate`` to get that
(``−∞`` entries get probability 0).

Defaults (released code's argparse default for LLaVA-1.5 MME / GPT-4V scripts): ``alpha=2``, ``k=10``,
``beta=0.1``; its POPE / CHAIR InstructBLIP scripts use (0.5, 4, 0.1) and (1.5, 4, 0.1).

Supported: LLaVA-style models (CLIP-style tower with a [CLS] token, one un-cropped image per sample given by
``input_ids`` placeholders, a text decoder followed by the output embedding with no logit post-processing).
Multi-image / any-res inputs and ``inputs_embeds``-only calls raise. ``vision_layer`` (default: the config's
``vision_feature_layer``) indexes the tower's layer list like the released code's ``layers[select_layer]``
(``-2`` = the penultimate layer LLaVA-1.5 takes its features from).

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_vlm, vlm_inputs
    >>> model = tiny_vlm("llava"); inputs = vlm_inputs("llava", model, batch=2, left_pad=1)   # 16 image tokens
    >>> damro = Damro(alpha=1.0, k=3, beta=0.1)
    >>> with attnkit.attach(model, [damro]), torch.no_grad():
    ...     out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    >>> out.shape[1] - inputs["input_ids"].shape[1], damro.last_outliers.shape   # [B, k] patch ids, top-k order
    (2, torch.Size([2, 3]))
    >>> damro.last_branch["inputs_embeds"].shape[1]    # 25 - 16 image tokens + 3 outliers
    12
"""

from __future__ import annotations

import math

import torch

from attnkit.branch import BranchedLogits, BranchInputs, positions_from_mask
from attnkit.interventions.base import register_intervention
from attnkit.interventions.pruning._vision_cls import ClsAttention

ORDERS = ("score", "raster")
CLS_RULES = ("merged", "head_mean")


def damro_logits(orig: torch.Tensor, outlier: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """DAMRO's rule: ``(1+α)·ℓ_orig − α·ℓ_outlier``, and ``−∞`` where ``ℓ_orig < log β + max ℓ_orig``.

    orig, outlier ``[..., V]`` → ``[..., V]`` (float32 math, returned in ``orig``'s dtype).

    Example (METHODS.md §6 worked example):
        >>> out = damro_logits(torch.tensor([2.0, 1.0, -1.0]), torch.tensor([2.5, 0.0, 0.0]), alpha=1.0, beta=0.1)
        >>> out.tolist(), [round(p, 4) for p in out.softmax(-1).tolist()], int(out.argmax())
        ([1.5, 2.0, -inf], [0.3775, 0.6225, 0.0], 1)
    """
    o = orig.float()
    combined = (1.0 + alpha) * o - alpha * outlier.float().to(o.device)  # [..., V]
    if beta > 0:
        cutoff = math.log(beta) + o.max(dim=-1, keepdim=True).values  # [..., 1]
        combined = combined.masked_fill(o < cutoff, float("-inf"))
    return combined.to(orig.dtype)


def select_outliers(patch_scores: torch.Tensor, k: int, order: str = "score") -> torch.Tensor:
    """Top-``k`` patches per sample → ``[B, k]`` long indices, score-descending (ties → earlier patch) or, with
    ``order="raster"``, re-sorted ascending. patch_scores ``[B, P]``.

    Example:
        >>> s = torch.tensor([[0.1, 0.5, 0.1, 0.3]])
        >>> select_outliers(s, 3).tolist(), select_outliers(s, 3, order="raster").tolist()
        ([[1, 3, 0]], [[0, 1, 3]])
    """
    if not 1 <= k <= patch_scores.shape[1]:
        raise ValueError(f"damro: k={k} but the image has {patch_scores.shape[1]} patches")
    top = patch_scores.float().argsort(dim=1, descending=True, stable=True)[:, :k]  # [B, k]
    return top.sort(dim=1).values if order == "raster" else top


def outlier_sequences(embeds: torch.Tensor, mask: torch.Tensor, image: torch.Tensor, outliers: torch.Tensor):
    """Build the branch inputs: each sample's image span replaced by its outlier tokens' embeddings, in the given
    order, re-padded on the left.

    embeds ``[B, N, C]`` (decoder inputs, image placeholders already holding the projected patches), mask ``[B, N]``
    (1 = real), image ``[B, N]`` bool, outliers ``[B, k]`` (image-token indices, i.e. patch ids) →
    ``(embeds' [B, N', C], mask' [B, N'], after [B, N'] bool: slot lies after the image)``.

    Example:
        >>> e = torch.arange(6.0).view(1, 6, 1)                  # tokens: t0 i0 i1 i2 t1 t2
        >>> img = torch.tensor([[0, 1, 1, 1, 0, 0]], dtype=torch.bool)
        >>> out, m, after = outlier_sequences(e, torch.ones(1, 6), img, torch.tensor([[2, 0]]))
        >>> out.flatten().tolist(), m.tolist(), after.tolist()
        ([0.0, 3.0, 1.0, 4.0, 5.0], [[1, 1, 1, 1, 1]], [[False, False, False, True, True]])
    """
    rows, masks, afters = [], [], []
    for b in range(embeds.shape[0]):
        pos = image[b].nonzero().flatten()  # [P]
        first, last = int(pos[0]), int(pos[-1])
        if last - first + 1 != len(pos):
            raise ValueError("damro: the image tokens of a sample must form one contiguous span (one image)")
        chosen = pos[outliers[b].to(pos.device)]  # [k] in the requested order
        index = torch.cat([torch.arange(first, device=pos.device), chosen,
                           torch.arange(last + 1, embeds.shape[1], device=pos.device)])  # [n_b]
        rows.append(embeds[b, index.to(embeds.device)])  # [n_b, C]
        masks.append(mask[b, index.to(mask.device)].long())  # [n_b]
        after = torch.zeros(len(index), dtype=torch.bool)
        after[first + len(chosen):] = True
        afters.append(after)
    width = max(r.shape[0] for r in rows)
    out = embeds.new_zeros(embeds.shape[0], width, embeds.shape[2])  # [B, N', C]
    out_mask = torch.zeros(embeds.shape[0], width, dtype=torch.long, device=mask.device)  # [B, N']
    out_after = torch.zeros(embeds.shape[0], width, dtype=torch.bool)  # [B, N']
    for b, (r, m, a) in enumerate(zip(rows, masks, afters)):
        out[b, width - r.shape[0]:] = r
        out_mask[b, width - r.shape[0]:] = m
        out_after[b, width - r.shape[0]:] = a
    return out, out_mask, out_after


_positions = positions_from_mask  # the name older code imported


@register_intervention
class Damro(BranchedLogits):
    name = "damro"
    conformance = {"neutral": {"alpha": 0.0, "beta": 0.0}, "active": {"alpha": 2.0, "k": 2}}
    requires = frozenset({"causal_lm", "image_tokens", "clip_cls_tower"})
    description = "DAMRO: contrastive decoding against the k ViT [CLS]-attention outlier tokens"
    runner = "decoder"

    def __init__(self, alpha: float = 2.0, k: int = 10, beta: float = 0.1, vision_layer: int | None = None,
                 cls_rule: str = "merged", order: str = "score", **target):
        if target.get("layers") is not None or target.get("heads") is not None:
            raise ValueError("damro: it edits the output logits, not attention heads; do not pass layers/heads "
                             "(the ViT layer is vision_layer)")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"damro: beta (plausibility threshold) must be in [0, 1], got {beta}")
        if int(k) < 1:
            raise ValueError(f"damro: k (number of outlier tokens) must be >= 1, got {k}")
        if cls_rule not in CLS_RULES:
            raise ValueError(f"damro: cls_rule must be one of {CLS_RULES}, got {cls_rule!r}")
        if order not in ORDERS:
            raise ValueError(f"damro: order must be one of {ORDERS}, got {order!r}")
        super().__init__(**target)
        self.alpha, self.k, self.beta = float(alpha), int(k), float(beta)
        self.vision_layer, self.cls_rule, self.order = vision_layer, cls_rule, order
        self._cls: ClsAttention | None = None
        #: ``[B, k]`` outlier patch ids of the last prefill (branch order)
        self.last_outliers: torch.Tensor | None = None

    @staticmethod
    def sampling_kwargs() -> dict:
        """``generate`` kwargs that sample from ``softmax(ℓ)`` directly, as the released code does."""
        return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}

    # ---- attach ------------------------------------------------------------------------------------------------
    def setup(self, model) -> None:
        if "vision" not in model.components:
            raise ValueError("damro needs a vision-language model with a CLIP-style vision tower")

    def install(self, handle) -> list:
        model = handle.model
        layer = self.vision_layer
        if layer is None:
            layer = getattr(model.config, "vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"damro: vision_feature_layer={layer!r}; give one int vision_layer")
        self._cls = ClsAttention(model, layers=[layer], merged=self.cls_rule == "merged")
        self._strategy = getattr(model.config, "vision_feature_select_strategy", "default")
        self._image_id = handle.description.image_token_id
        if self._image_id is None:
            raise ValueError(f"damro: {type(model).__name__} has no image token id; LLaVA-style models are supported")
        hooks = super().install(handle)  # the branch machinery (refuses a model without decoder / output embedding)
        return self._cls.install(handle) + hooks

    # ---- the outlier branch ------------------------------------------------------------------------------------
    def branch_inputs(self, call: dict) -> BranchInputs | None:
        ids, embeds = call["ids"], call["embeds"]
        if ids is None:
            raise ValueError("damro needs input_ids (to find the image tokens); inputs_embeds alone are unsupported")
        image = ids == self._image_id  # [B, N]
        if not bool(image.any()):
            return None  # text only: nothing to contrast against
        if embeds is None or embeds.shape[:2] != ids.shape:
            raise RuntimeError("damro: the decoder did not receive this call's inputs_embeds")
        if not self._cls.rows:
            raise RuntimeError("damro: the vision tower did not run for this image prompt (no [CLS] attention)")
        scores = self._cls.patch_scores(self._strategy)  # [B_img, P]
        if ids.shape[0] != scores.shape[0] and ids.shape[0] % scores.shape[0] == 0:
            # generate encodes each image once, then repeat_interleaves it for beams / return sequences
            scores = scores.repeat_interleave(ids.shape[0] // scores.shape[0], dim=0)  # [B, P]
        if scores.shape[0] != ids.shape[0] or not bool(image.any(1).all()):
            raise ValueError("damro: every sample needs exactly one image (its own outlier set and branch cache); "
                             f"got {scores.shape[0]} images for a batch of {ids.shape[0]}")
        counts = image.sum(1)
        if bool((counts != scores.shape[1]).any()):
            raise ValueError(f"damro: samples have {counts.tolist()} image tokens but the tower gave "
                             f"{scores.shape[1]} patches; one un-cropped image per sample is supported")
        self.last_outliers = select_outliers(scores, self.k, self.order)  # [B, k]
        mask = call["mask"] if call["mask"] is not None else torch.ones_like(ids)  # [B, N]
        branch, branch_mask, after = outlier_sequences(embeds, mask, image, self.last_outliers)  # [B, N', C] …
        return BranchInputs({"inputs_embeds": branch, "attention_mask": branch_mask}, valid=after)

    def _decode(self, call: dict, q_out: int):
        if self._state is not None and call["ids"] is not None and bool((call["ids"] == self._image_id).any()):
            raise ValueError("damro: image tokens after the prefill are unsupported")
        return super()._decode(call, q_out)

    def combine(self, main: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return damro_logits(main, branch, self.alpha, self.beta)
