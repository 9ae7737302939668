"""Head-specific visual modulation — "Fixing Imbalanced Attention…" / PAINT (Arif et al., arXiv 2501.12206).

Token sets from the vision tower's [CLS] attention (per sample; the released code uses batch element 0):
*local* = top ``local_ratio`` of patches by the first ViT layer's head-summed [CLS] row; *summary* = the top-n patches
of the penultimate layer's row, n = number of Tukey outliers (``> Q3 + 1.5·IQR``); local := local − summary.
In the target LLM layers (default ``2..L−1``) the **last query row** of every call gets, before the softmax,
``z_j ← z_j + α|z_j|`` on local tokens and ``z_j + β|z_j|`` on summary tokens (α = 0.7, β = 0.3). The boost is
proportional to each head's own ``|z|`` — that is what makes it head-specific; there is no per-head coefficient.

Optional classifier-free-guidance logit term (``gamma``; the released ``CFGLogits`` behind ``--use-cfg``, inherited
from PAI): a second, text-only pass — the prompt with its image tokens removed, run on the **stock** model (the
released code switches the modulation off for it), with its own KV cache that follows every decode step — gives
``ℓ_u``; with ``ℓ_c`` the (modulated) logits and ``ls = log_softmax``, the next-token logits become
``γ·(ls(ℓ_c) − ls(ℓ_u)) + ls(ℓ_u)``, set to ``−∞`` where ``ls(ℓ_c) < log 0.1 + max ls(ℓ_c)`` (:func:`cfg_logits`).
Only the last position of each call is replaced (the position ``generate`` reads; the released code is a logits
processor). ``gamma=1`` (default) is the released default (``--use-cfg`` off) and runs no extra pass; the README's
commands use ``--gamma 1.1``, the eval scripts' argparse default is 2. Greedy decoding and sampling are supported
(the branch cache follows beam reordering too); inputs without image tokens are left unchanged.

Why eager only (no fused path): the rule ``z + α|z|`` depends on the raw pre-softmax score of each key, its sign and
size. The per-key statistics the fused backends compute (``key_stats``: the attention each key receives) are
probabilities, which fix a row's scores only up to the row's log-normaliser, so ``|z_j|`` cannot be recovered from
them; the boost is also not constant over a key group, so ``group_factors`` cannot express it. It therefore
materialises the scores (``edit_scores``) on the ``eager`` backend — for every row of a prefill, although only the
last row changes (an exact fused path would need a backend hook that recomputes one row from q and k).

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

import math

from attnkit.branch import read_call
from attnkit.hooks.compat import cache_kwargs, output_cache
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


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, gamma: float, plausibility: float = 0.1) -> torch.Tensor:
    """The released ``CFGLogits``: ``γ·(ls(c) − ls(u)) + ls(u)`` with ``ls = log_softmax``, ``−∞`` where
    ``ls(c) < log(plausibility) + max ls(c)``; ``γ = 1`` returns ``ls(c)`` unmasked. cond/uncond ``[..., V]``.

    Example (hand-computed: ls(c) = [−0.349, −1.349, −3.349], ls(u) = [−0.152, −2.652, −2.652]):
        >>> out = cfg_logits(torch.tensor([2.0, 1.0, -1.0]), torch.tensor([2.5, 0.0, 0.0]), gamma=1.1)
        >>> [round(x, 4) for x in out.tolist()]
        [-0.3687, -1.2187, -inf]
    """
    ls_c = torch.log_softmax(cond.float(), dim=-1)  # [..., V]
    if gamma == 1:
        return ls_c
    ls_u = torch.log_softmax(uncond.float().to(ls_c.device), dim=-1)
    out = gamma * (ls_c - ls_u) + ls_u
    cutoff = math.log(plausibility) + ls_c.max(dim=-1, keepdim=True).values  # [..., 1]
    return out.masked_fill(ls_c < cutoff, float("-inf"))


def text_only_inputs(ids: torch.Tensor, mask: torch.Tensor | None, image_token_id: int):
    """The unconditional branch's prompt: each sample's real tokens without its image tokens, left-padded again.
    ids/mask ``[B, N]`` → ``(ids' [B, N'], mask' [B, N'])``.

    Example:
        >>> ids, mask = torch.tensor([[0, 7, 9, 9, 5], [7, 9, 9, 5, 6]]), torch.tensor([[0, 1, 1, 1, 1], [1] * 5])
        >>> text_only_inputs(ids, mask, image_token_id=9)
        (tensor([[0, 7, 5],
                [7, 5, 6]]), tensor([[0, 1, 1],
                [1, 1, 1]]))
    """
    mask = torch.ones_like(ids) if mask is None else mask
    rows = [ids[b][(ids[b] != image_token_id) & mask[b].bool()] for b in range(ids.shape[0])]
    width = max(len(r) for r in rows)
    out = ids.new_zeros(ids.shape[0], width)  # [B, N']
    out_mask = torch.zeros_like(out)
    for b, r in enumerate(rows):
        out[b, width - len(r):] = r
        out_mask[b, width - len(r):] = 1
    return out, out_mask


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
    conformance = {"neutral": {"alpha": 0.0, "beta": 0.0}, "active": {"gamma": 1.5}}
    requires = frozenset({"image_tokens", "clip_cls_tower"})
    description = "PAINT: boost local (+α|z|) and summary (+β|z|) image tokens in the last query row"

    def __init__(self, alpha: float = 0.7, beta: float = 0.3, local_ratio: float = 0.25, gamma: float = 1.0,
                 plausibility: float = 0.1, **target):
        if gamma < 0 or not 0 < plausibility <= 1:
            raise ValueError(f"paint: gamma must be ≥ 0 and plausibility in (0, 1], got {gamma}, {plausibility}")
        super().__init__(**target)
        self.alpha, self.beta, self.local_ratio = alpha, beta, local_ratio
        self.gamma, self.plausibility = float(gamma), float(plausibility)
        self._handle = None
        self._cls: ClsAttention | None = None
        self._sets: tuple[int, dict] | None = None
        self._call: dict | None = None  # the current outer call (gamma != 1)
        self._branch: dict | None = None  # the text-only branch of the current sequence: cache, mask
        self._busy = False

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
        self._call, self._branch, self._sets = None, None, None  # sequence ids restart with every attachment
        hooks = self._cls.install(handle)
        if self.gamma != 1:
            self._image_id = handle.description.image_token_id
            hooks += [handle.hook(handle.model, self._pre_outer, pre=True, with_kwargs=True),
                      handle.hook(handle.model, self._post_outer, with_kwargs=True)]
        return hooks

    # ---- the classifier-free-guidance term (gamma != 1) ------------------------------------------------------
    def _pre_outer(self, module, args, kwargs):
        if self._busy:
            return
        self._call = read_call(args, kwargs)

    def _post_outer(self, module, args, kwargs, output):
        call, self._call = self._call, None
        logits = getattr(output, "logits", None)
        if self._busy or call is None or logits is None:
            return None
        if call["ids"] is None:
            raise ValueError("paint: gamma needs input_ids (to build the text-only prompt); inputs_embeds alone are "
                             "unsupported")
        uncond = self._prefill(call) if call["prefill"] else self._decode(call)  # [B, V] or None
        if uncond is None:
            return None
        last = cfg_logits(logits[:, -1], uncond, self.gamma, self.plausibility).to(logits.dtype)  # [B, V]
        output.logits = torch.cat([logits[:, :-1], last[:, None]], dim=1)
        return output

    def _prefill(self, call: dict) -> torch.Tensor | None:
        self._branch = None
        ids = call["ids"]
        if not bool((ids == self._image_id).any()):
            return None  # a text-only prompt: nothing to guide against
        text_ids, text_mask = text_only_inputs(ids, call["mask"], self._image_id)  # [B, N'], [B, N']
        logits, cache = self._run(text_ids, text_mask, None)
        self._branch = {"cache": cache, "mask": text_mask, "seen": ids.shape[1]}
        self._follow_reorders(call["cache"])
        return logits

    def _decode(self, call: dict) -> torch.Tensor | None:
        branch, ids = self._branch, call["ids"]
        if branch is None:
            return None
        new_mask = call["mask"][:, -ids.shape[1]:] if call["mask"] is not None else torch.ones_like(ids)  # [B, q]
        mask = torch.cat([branch["mask"], new_mask.to(branch["mask"])], dim=1)  # [B, T + q]
        logits, branch["cache"] = self._run(ids, mask, branch["cache"])
        branch["mask"] = mask
        return logits

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        """One stock, untracked pass of the text-only branch → (last-position logits ``[B, V]``, its cache)."""
        model = self._handle.model
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -ids.shape[1]:]  # [B, q]
        self._busy = True
        try:
            with self._handle.detached():
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            **cache_kwargs(model, cache, True))
        finally:
            self._busy = False
        return out.logits[:, -1], output_cache(out)

    def _follow_reorders(self, main_cache) -> None:
        """Beam search reorders the main cache in place: the branch cache and mask follow the same beams."""
        if main_cache is None or not hasattr(main_cache, "reorder_cache"):
            return
        branch, original = self._branch, main_cache.reorder_cache

        def reorder_cache(beam_idx, *args, **kwargs):
            result = original(beam_idx, *args, **kwargs)
            if self._branch is branch:
                branch["cache"].reorder_cache(beam_idx)
                branch["mask"] = branch["mask"].index_select(0, beam_idx.to(branch["mask"].device))
            return result

        main_cache.reorder_cache = reorder_cache

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
