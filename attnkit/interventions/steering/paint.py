"""Head-specific visual modulation — "Fixing Imbalanced Attention…" / PAINT (Arif et al., arXiv 2501.12206).

Token sets from the vision tower's [CLS] attention (per sample; the released code uses batch element 0):
*local* = top ``local_ratio`` of patches by the first ViT layer's head-summed [CLS] row; *summary* = the top-n patches
of the penultimate layer's row, n = number of Tukey outliers (``> Q3 + 1.5·IQR``); local := local − summary.
In the target LLM layers (default ``2..L−1``) the **last query row** of every call gets, before the softmax,
``z_j ← z_j + α|z_j|`` on local tokens and ``z_j + β|z_j|`` on summary tokens (α = 0.7, β = 0.3). The boost is
proportional to each head's own ``|z|`` — that is what makes it head-specific; there is no per-head coefficient.
The rule depends on the scores themselves, so it runs on the ``eager`` backend (``edit_scores``).

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_vlm, vlm_inputs
    >>> model = tiny_vlm("llava"); inputs = vlm_inputs("llava", model, batch=2)
    >>> with attnkit.attach(model, [Paint()]) as handle, torch.no_grad():
    ...     _ = model(**inputs)
    ...     handle.interventions[0].token_sets()["local"].sum(1).tolist()    # 25 % of 16 patches
    [4, 4]
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.pruning._vision_cls import ClsAttention, image_token_scores, vision_layers
from attnkit.targets import Target


def modulate(z: torch.Tensor, local: torch.Tensor, summary: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``z + α|z|`` on local keys, ``z + β|z|`` on summary keys. z ``[..., K]``, masks broadcastable bool.

    Example (METHODS.md worked example):
        >>> modulate(torch.tensor([2., 1., -1., .5]), torch.tensor([1, 0, 0, 0]).bool(),
        ...          torch.tensor([0, 0, 1, 0]).bool(), 0.7, 0.3).tolist()
        [3.4000000953674316, 1.0, -0.699999988079071, 0.5]
    """
    gain = local.float() * alpha + summary.float() * beta
    return z + gain * z.abs()


def tukey_outlier_count(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x [B, P]``: how many values exceed ``Q3 + 1.5·IQR``.

    Example:
        >>> tukey_outlier_count(torch.tensor([[1., 1., 1., 1., 1., 1., 1., 9.]])).tolist()
        [1]
    """
    q1, q3 = torch.quantile(x.float(), 0.25, dim=1), torch.quantile(x.float(), 0.75, dim=1)
    return (x > (q3 + 1.5 * (q3 - q1))[:, None]).sum(1)


@register_intervention
class Paint(Intervention):
    name = "paint"
    conformance = {"neutral": {"alpha": 0.0, "beta": 0.0}, "active": {}}
    requires = frozenset({"image_tokens", "clip_cls_tower"})
    description = "PAINT: boost local (+α|z|) and summary (+β|z|) image tokens in the last query row"

    def __init__(self, alpha: float = 0.7, beta: float = 0.3, local_ratio: float = 0.25, **target):
        super().__init__(**target)
        self.alpha, self.beta, self.local_ratio = alpha, beta, local_ratio
        self._handle = None
        self._cls: ClsAttention | None = None
        self._sets: tuple[int, dict] | None = None

    def setup(self, model) -> None:
        if self.target.layers is None:
            n = model.component("text").num_layers
            self.target = Target(layers=list(range(min(2, n - 1), n)), heads=self.target.heads,
                                 modules=self.target.modules)

    def install(self, handle) -> list:
        self._handle = handle
        n = len(vision_layers(handle.model))
        self._cls = ClsAttention(handle.model, layers=sorted({0, max(n - 2, 0)}))
        self._strategy = getattr(handle.model.config, "vision_feature_select_strategy", "default")
        return self._cls.install(handle)

    def token_sets(self) -> dict[str, torch.Tensor]:
        """``{"local", "summary"}`` bool ``[B, N]`` over the current prefill's tokens."""
        tracker = self._handle.tracker
        if self._sets is not None and self._sets[0] == tracker.sequence_id:
            return self._sets[1]
        image = tracker.mask("image")  # [B, N]
        first, last = self._cls.layers[0], self._cls.layers[-1]
        heads_sum = lambda i: self._cls.rows[i].sum(1)  # noqa: E731  [B, P+1]
        cut = slice(1, None) if self._strategy == "default" else slice(None)
        local_s, summary_s = heads_sum(first)[:, cut], heads_sum(last)[:, cut]  # [B, P]
        n_sum = tukey_outlier_count(summary_s)  # [B]
        local, summary = [torch.zeros_like(image) for _ in range(2)]
        for b in range(image.shape[0]):
            idx = image[b].nonzero().flatten()
            n_local = int(len(idx) * self.local_ratio)
            local[b, idx[local_s[b].topk(n_local).indices.cpu()]] = True
            summary[b, idx[summary_s[b].topk(int(n_sum[b])).indices.cpu()]] = True
        image_token_scores(local_s, image)  # checks the patch ↔ token count
        sets = {"local": local & ~summary, "summary": summary}
        self._sets = (tracker.sequence_id, sets)
        return sets

    def edit_scores(self, scores, ctx):  # [B, H, Q, K]
        if self._cls is None or not self._cls.rows and self._sets is None:
            return scores
        sets = self.token_sets()
        total = ctx.tracker.length
        keys = slice(total - ctx.k_len, total)
        local = _pad_to(sets["local"], total)[:, keys].to(ctx.device)[:, None, None, :]  # [B, 1, 1, K]
        summary = _pad_to(sets["summary"], total)[:, keys].to(ctx.device)[:, None, None, :]
        last = ctx.q_len - 1
        rows = torch.arange(ctx.q_len, device=ctx.device) if ctx.query_rows is None else ctx.query_rows.to(ctx.device)
        is_last = (rows == last)[None, None, :, None]  # [1, 1, Q, 1]
        return torch.where(is_last, modulate(scores, local, summary, self.alpha, self.beta), scores)


def _pad_to(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Extend a ``[B, N]`` prefill mask with False for decode positions → ``[B, length]``."""
    return torch.nn.functional.pad(mask, (0, length - mask.shape[1]))
