"""[CLS] attention inside a CLIP-style vision tower, without N² and on any attention implementation.

Forward hooks on ``q_proj`` / ``k_proj`` of the chosen vision layers keep the [CLS] query and all keys; the [CLS]
row is ``softmax(q_cls · Kᵀ · scale)`` per head (``[B, H, P+1]``), or one merged head over the raw projections with
``scale = C^{-1/2}`` (DAMRO's rule, ``C`` = hidden size). Used by VTC-CLS, DAMRO and PAINT.

Patch ↔ image-token mapping (LLaVA, ``vision_feature_select_strategy="default"``): image token i of a sample is
patch i (the [CLS] column is dropped); with ``"full"`` token 0 is the [CLS] itself. One image per sample.

Example:
    >>> import torch
    >>> from attnkit.testing import tiny_vlm, vlm_inputs
    >>> model = tiny_vlm("llava"); inputs = vlm_inputs("llava", model, batch=2)
    >>> cls = ClsAttention(model, layers=[0, 1]); hooks = cls.install()
    >>> with torch.no_grad(): _ = model(**inputs)
    >>> cls.rows[1].shape                                       # [B, H, 1 + 16 patches]
    torch.Size([2, 2, 17])
    >>> for h in hooks: h.remove()
"""

from __future__ import annotations

import torch


def vision_layers(model) -> list[torch.nn.Module]:
    """The attention modules of a CLIP-style vision tower, in order (must have ``q_proj`` and ``k_proj``)."""
    from attnkit.hooks.transformers import config_of

    vision_config = getattr(model.config, "vision_config", None)
    found = [m for m in model.modules() if config_of(m) is vision_config
             and type(m).__name__.endswith("Attention") and hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if not found:
        raise ValueError(f"{type(model).__name__}: no CLIP-style vision attention (q_proj/k_proj) found")
    return found


class ClsAttention:
    """Collects the [CLS] attention row of selected vision layers at every vision forward."""

    def __init__(self, model, layers, merged: bool = False):
        self.modules = vision_layers(model)
        n = len(self.modules)
        self.layers = [i + n if i < 0 else i for i in layers]
        if any(not 0 <= i < n for i in self.layers):
            raise ValueError(f"vision layers {layers} out of range: the tower has layers 0..{n - 1}")
        self.merged = merged
        self.rows: dict[int, torch.Tensor] = {}  # layer -> [B, H, P+1] (or [B, P+1] merged)
        self._q: dict[int, torch.Tensor] = {}

    def install(self, handle=None) -> list:
        """Hook the chosen layers; with a ``handle`` the hooks are the handle's (inactive while it is disabled,
        inert in a deep copy of the model)."""
        def register(module, fn):
            return handle.hook(module, fn) if handle is not None else module.register_forward_hook(fn)

        hooks = []
        for i in self.layers:
            mod = self.modules[i]
            hooks.append(register(mod.q_proj, self._keep_query(i)))
            hooks.append(register(mod.k_proj, self._score(i, mod)))
        return hooks

    def _keep_query(self, i):
        def hook(module, args, out):
            self._q[i] = out[:, :1].detach()  # [B, 1, C] the [CLS] query
        return hook

    def _score(self, i, attn):
        def hook(module, args, keys):
            q = self._q.pop(i)  # [B, 1, C]
            keys = keys.detach()  # [B, P+1, C]
            if self.merged:
                s = (q @ keys.transpose(1, 2))[:, 0] * keys.shape[-1] ** -0.5  # [B, P+1]
                self.rows[i] = torch.softmax(s.float(), -1)
                return
            heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
            d = keys.shape[-1] // heads
            qh = q.view(q.shape[0], 1, heads, d).transpose(1, 2)  # [B, H, 1, d]
            kh = keys.view(keys.shape[0], -1, heads, d).transpose(1, 2)  # [B, H, P+1, d]
            scale = getattr(attn, "scale", d ** -0.5)
            self.rows[i] = torch.softmax((qh @ kh.transpose(-1, -2)).float()[:, :, 0] * scale, -1)  # [B, H, P+1]
        return hook

    def patch_scores(self, strategy: str = "default") -> torch.Tensor:
        """Sum over layers of the head-mean [CLS] row → ``[B, n_image_tokens]`` in image-token order."""
        rows = [r if self.merged else r.mean(1) for r in (self.rows[i] for i in self.layers)]  # [B, P+1] each
        total = torch.stack(rows).sum(0)
        return total[:, 1:] if strategy == "default" else total


def image_token_scores(patch_scores: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Scatter per-patch scores ``[B, P]`` onto the image-token positions ``image_mask [B, N]`` → ``[B, N]``.
    A sample with no (real) image token — e.g. a fully padded row — gets all zeros.

    Example:
        >>> image_token_scores(torch.tensor([[0.4, 0.5]]), torch.tensor([[False, True, True, False]])).tolist()
        [[0.0, 0.4000000059604645, 0.5, 0.0]]
    """
    out = torch.zeros(image_mask.shape, dtype=torch.float32)
    for b in range(image_mask.shape[0]):
        idx = image_mask[b].nonzero().flatten()
        if len(idx) == 0:
            continue
        if len(idx) != patch_scores.shape[1]:
            raise ValueError(f"sample {b} has {len(idx)} image tokens but the vision tower gave "
                             f"{patch_scores.shape[1]} patches; one un-cropped image per sample is supported")
        out[b, idx] = patch_scores[b].float().cpu()
    return out
