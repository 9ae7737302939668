"""VHR (He et al., ACL 2025): reinforce the vision-aware heads of an LVLM by scaling their outputs.

Vision-aware head divergence of head i in layer l, at the last prompt position:
``VHD_{l,i} = ‖A_{l,i}(image + text) − A_{l,i}(text only)‖₂`` where ``A`` is the per-head attention output
(before ``o_proj``). Heads with ``VHD > median_l`` (``torch.median``: the lower middle value) are reinforced,
``Ã = α·A`` (α = 2), per sample, at every position of the prefill and of every decode step (the KV-consistent
choice). Outlier removal (paper): ``VHD_{l,i} := 0`` when ``VHD_{l,i} > μ_l + σ_l`` and ``TA_{l,i} > μ_l + σ_l``
of ``TA = ‖A(text only)‖²`` (population σ, per layer — the paper leaves both open).

``select="vhd"`` (default) runs one extra text-only forward at prefill (image tokens removed, stock model) and
records each head's last-row output through forward pre-hooks on ``o_proj``; the image stream is compared layer by
layer inside the main forward, so layer l sees earlier layers already reinforced; the text stream is not reinforced.
``select="fixed"`` scales exactly the target heads (e.g. a precomputed head map). Both use ``edit_output`` only, so
they run on the fused ``torch`` backend.

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_vlm, vlm_inputs
    >>> model = tiny_vlm("llava"); inputs = vlm_inputs("llava", model, batch=2)
    >>> with attnkit.attach(model, [VHR(alpha=2.0, layers=[0, 1])]) as handle, torch.no_grad():
    ...     _ = model(**inputs)
    ...     handle.interventions[0].selected[1].shape      # [B, H] heads reinforced in layer 1
    torch.Size([2, 4])
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.targets import Target


def select_vision_heads(vhd: torch.Tensor, ta: torch.Tensor | None = None) -> torch.Tensor:
    """Heads above the per-sample median VHD after the paper's outlier removal. vhd/ta ``[B, H]`` → bool ``[B, H]``.

    Example (METHODS.md worked example):
        >>> vhd = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
        >>> select_vision_heads(vhd).int().tolist()
        [[0, 1, 1, 0]]
        >>> select_vision_heads(vhd, ta=torch.tensor([[0.0, 5.0, 0.0, 0.0]])).int().tolist()
        [[0, 0, 1, 1]]
    """
    vhd = vhd.float()
    if ta is not None:
        v_thr = vhd.mean(-1, keepdim=True) + vhd.std(-1, unbiased=False, keepdim=True)  # [B, 1]
        ta = ta.float()
        t_thr = ta.mean(-1, keepdim=True) + ta.std(-1, unbiased=False, keepdim=True)
        vhd = torch.where((vhd > v_thr) & (ta > t_thr), torch.zeros_like(vhd), vhd)
    median = vhd.median(dim=-1, keepdim=True).values  # lower middle value for even H
    return vhd > median


def text_only_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int,
                     pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove image tokens per sample and left-pad back to a rectangle. Returns ``(ids, mask)`` ``[B, N_t]``.

    Example:
        >>> ids, mask = text_only_inputs(torch.tensor([[5, 9, 9, 6], [0, 5, 9, 7]]),
        ...                              torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]), image_token_id=9)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6], [5, 7]], [[1, 1], [1, 1]])
    """
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    keep = real & (input_ids != image_token_id)  # [B, N]
    rows = [input_ids[b][keep[b]] for b in range(input_ids.shape[0])]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return ids.to(input_ids.device), mask.to(input_ids.device)


@register_intervention
class VHR(Intervention):
    name = "vhr"
    conformance = {"neutral": {"alpha": 1.0}, "active": {"alpha": 2.0},
                   "not_applicable": {"generate": "heads are selected once per sequence, at the prefill; recomputing "
                                                  "selects them again over the grown prompt"}}
    requires = frozenset({"text_decoder", "image_tokens"})
    description = "VHR: multiply the outputs of vision-aware heads (VHD > median) by alpha"

    def __init__(self, alpha: float = 2.0, select: str = "vhd", outlier_removal: bool = True, **target):
        if select not in ("vhd", "fixed"):
            raise ValueError(f"vhr: select must be 'vhd' or 'fixed', got {select!r}")
        super().__init__(**target)
        self.alpha, self.select, self.outlier_removal = alpha, select, outlier_removal
        self._text_out: dict[int, torch.Tensor] = {}  # layer -> [B, H, D] last-row head outputs, text-only pass
        self._in_text_pass = False
        self._handle = None
        #: per layer, the ``[B, H]`` heads reinforced for the current sequence (select="vhd")
        self.selected: dict[int, torch.Tensor] = {}

    def setup(self, model) -> None:
        if self.target.layers is None and self.select == "vhd":  # paper: layer 1 plus the last 14 of 32
            n = model.component("text").num_layers
            last = max(1, round(n * 14 / 32))
            layers = sorted({min(1, n - 1), *range(n - last, n)})
            self.target = Target(layers=layers, heads=self.target.heads, modules=self.target.modules)

    def install(self, handle) -> list:
        self._handle = handle
        if self.select != "vhd":
            return []
        hooks = [handle.hook(handle.model, self._before_forward, pre=True, with_kwargs=True)]
        sites = handle.sites("text")
        for site in sites:
            proj = getattr(site.module, "o_proj", None)
            if proj is None:
                raise ValueError(f"vhr: {site.qualname} has no o_proj; select='vhd' needs per-head outputs there")
            # always: it records during the text-only pass, which runs detached (stock and untracked)
            hooks.append(handle.hook(proj, self._recorder(site.layer, site.num_heads), pre=True, always=True))
        return hooks

    # ---- the text-only pass ----------------------------------------------------------------------------------
    def _recorder(self, layer: int, num_heads: int):
        def record(module, args):
            if self._in_text_pass:
                x = args[0][:, -1]  # [B, H*D] last position (left padding keeps it real)
                self._text_out[layer] = x.reshape(x.shape[0], num_heads, -1).detach()  # [B, H, D]
        return record

    def _before_forward(self, module, args, kwargs):
        handle = self._handle
        if self._in_text_pass or not handle.active or not handle.tracker.last_was_prefill:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        image_id = handle.description.image_token_id
        if ids is None or image_id is None:
            raise ValueError("vhr: select='vhd' needs input_ids with image tokens (and config.image_token_id)")
        text_ids, text_mask = text_only_inputs(ids, kwargs.get("attention_mask"), image_id)
        self._text_out.clear()
        self._in_text_pass = True
        try:
            with handle.detached(), torch.no_grad():
                module(input_ids=text_ids, attention_mask=text_mask, use_cache=False)
        finally:
            self._in_text_pass = False
        return None

    # ---- the edit -----------------------------------------------------------------------------------------------
    def edit_output(self, out, ctx):  # out [B, H, Q, D]
        if self.select == "fixed":
            return out * self.alpha
        heads = ctx.state.get("heads")
        if heads is None:
            text = self._text_out.get(ctx.layer)
            if text is None or not ctx.is_prefill:
                return out  # no text-only reference for this sequence (e.g. inputs_embeds): leave unchanged
            vhd = (out[:, :, -1].float() - text.float()).norm(dim=-1)  # [B, H]
            ta = text.float().pow(2).sum(-1) if self.outlier_removal else None  # [B, H]
            heads = select_vision_heads(vhd, ta)  # [B, H]
            ctx.state["heads"] = heads
            self.selected[ctx.layer] = heads.cpu()
        gain = torch.where(heads, self.alpha, 1.0).to(out.dtype)  # [B, H]
        return out * gain[:, :, None, None]
