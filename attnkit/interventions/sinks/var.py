"""VAR — Visual Attention Redistribution (Kang et al., ICLR 2025), METHODS.md §1.

In image-centric rows (image mass ≥ ``min_image_mass`` and visual non-sink ratio ≥ ρ), every sink token (text and
visual, found by massive activation in the sink dimensions of the layer input) keeps ``1 − p`` of its attention; the
freed mass ``Ω = p·Σ_sinks A`` goes to the non-sink image tokens in proportion to their attention. Rows stay
normalised. The rule is a pure group reweighting (:meth:`group_factors`) over four key groups — visual sinks, text
sinks, non-sink image tokens, everything else — so it needs no ``[Q, K]`` matrix on backends with grouped kernels.

Conventions (``convention=``):
  * ``"paper"`` (default): ``p`` = fraction of sink attention *recycled*, ``rho`` = *minimum* non-sink share.
  * ``"code"``: the released code's parameters, ``p`` = fraction *kept* (= 1 − paper p), ``rho`` = *maximum* visual
    sink share (with the code's +1e-6 per image probability in the denominator).
  The released config (``p: 0.6, rho: 0.5`` in code terms) equals the defaults here: paper ``p=0.4, rho=0.5``.

A layer in which no visual sink was found (per sample) is left untouched (``require_visual_sink=True``, default):
the released code selects rows only when the layer has visual sinks (its ``HeadFork`` returns no candidate rows
otherwise), so the text-sink mass (e.g. BOS) is never moved there. ``require_visual_sink=False`` is the paper's rule
read literally: with no visual sink the non-sink ratio is 1, the row qualifies and ``p`` of the text-sink mass goes to
the image tokens (a row ``[.30, 0, .40, .30]`` = other, image, text sink, image becomes ``[.30, 0, .24, .46]``).
Default = the released code because the paper never states what happens in such a layer and the code is what the
published numbers come from.

Other defaults follow the released code too: τ = 20 (strict ``>``), sinks only in layers ≥ 2 (code
``range(L)[2:]``), the last layer modified (``except_last_layer=False``: the code's flag is shadowed by a class
attribute, so the published numbers come from a run that modifies it; ``True`` is the paper), and in the prefill only
the query rows after the image (``queries="after_image"``, the code's ``q ≥ im + 576`` filter; ``"text"`` = every
text row, the paper; ``"all"``). Sinks are detected at prefill and reused while decoding; each new row is re-tested
at every step.

Sink dimensions (``sink_dims``) are a property of the base LLM and must be given: LLaVA-1.5-7B / LLaMA-2-7B
[1415, 2533] and LLaVA-1.5-13B [2100, 4743] (released code), Qwen2-VL-7B [458, 2570] (secondary sources; the presets
``var-llava`` / ``var-qwen2-vl`` set them). ``sink_dims="auto"`` is an attnkit heuristic absent from the paper: the
``num_auto_dims`` dimensions with the largest normalised activation, chosen **per sample at each prefill** from the
first sink layer's input (nothing is kept across sequences or models). Attaching without ``sink_dims`` is refused.

Example (METHODS.md worked example):
    >>> import torch
    >>> A = torch.tensor([0.40, 0.15, 0.15, 0.10, 0.05, 0.15])
    >>> groups = torch.tensor([2, 1, 3, 3, 3, 0])      # BOS text sink, v1 visual sink, v2..v4 image, t
    >>> mass = torch.zeros(4).index_add_(0, groups, A)  # [M_other, M_vsink, M_tsink, M_image]
    >>> f = var_factors(mass, p=0.4, rho=0.5)
    >>> [round(x, 6) for x in (A * f[groups]).tolist()]
    [0.24, 0.09, 0.26, 0.173333, 0.086667, 0.15]
    >>> torch.equal(var_factors(mass, p=0.4, rho=0.8), torch.ones(4))
    True
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.sinks.detect import massive_activation_sinks, top_activation_dims

OTHER, VSINK, TSINK, IMAGE = 0, 1, 2, 3


def var_factors(mass: torch.Tensor, p: float, rho: float, min_image_mass: float = 0.2,
                convention: str = "paper", n_image: torch.Tensor | float = 0.0,
                visual_sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Group factors ``[..., 4]`` from group masses ``[..., 4]`` (other, visual sink, text sink, image non-sink).

    Factors sum to one with the masses (``Σ M_g c_g = 1``), so they are exact with or without renormalisation.
    ``visual_sinks`` (bool, broadcastable to ``mass[..., 0]``): whether the sample's layer has any visual sink; where
    it is False the factors are 1 (the released code's rule; None = the paper's, no such test).

    Example (a layer without visual sink: other, image, text sink, image):
        >>> row, groups = torch.tensor([.30, 0, .40, .30]), torch.tensor([0, 3, 2, 3])
        >>> mass = torch.zeros(4).index_add_(0, groups, row)
        >>> [round(x, 6) for x in (row * var_factors(mass, 0.4, 0.5)[groups]).tolist()]   # paper, read literally
        [0.3, 0.0, 0.24, 0.46]
        >>> torch.equal(var_factors(mass, 0.4, 0.5, visual_sinks=torch.tensor(False)), torch.ones(4))
        True
    """
    mass = mass.float()
    m_vs, m_ts, m_img = mass[..., VSINK], mass[..., TSINK], mass[..., IMAGE]
    image_mass = m_vs + m_img  # [...]
    if convention == "paper":
        recycled = p
        ratio_ok = m_img >= rho * image_mass
    elif convention == "code":
        recycled = 1.0 - p
        sink_share = m_vs / (image_mass + 1e-6 * torch.as_tensor(n_image, dtype=mass.dtype, device=mass.device))
        ratio_ok = sink_share <= rho
    else:
        raise ValueError(f"unknown VAR convention {convention!r}; use 'paper' or 'code'")
    qualifies = (image_mass >= min_image_mass) & ratio_ok & (m_img > 0)  # [...]
    if visual_sinks is not None:
        qualifies = qualifies & visual_sinks.to(qualifies.device)  # released code: no visual sink, no candidate row
    budget = recycled * (m_vs + m_ts)  # Ω
    factors = torch.ones_like(mass)
    factors[..., VSINK] = 1.0 - recycled
    factors[..., TSINK] = 1.0 - recycled
    factors[..., IMAGE] = 1.0 + budget / m_img.clamp_min(1e-30)
    return torch.where(qualifies[..., None], factors, torch.ones_like(factors))


@register_intervention
class VAR(Intervention):
    name = "var"
    conformance = {"neutral": {"p": 0.0, "sink_dims": "auto"},
                   "active": {"p": 0.6, "first_layer": 0, "except_last_layer": False, "sink_dims": "auto"}}
    requires = frozenset({"text_decoder", "image_tokens"})
    description = "Visual Attention Redistribution: recycle sink attention to non-sink image tokens"

    def __init__(self, p: float = 0.4, rho: float = 0.5, tau: float = 20.0, sink_dims: list | str | None = None,
                 min_image_mass: float = 0.2, convention: str = "paper", queries: str = "after_image",
                 first_layer: int = 2, except_last_layer: bool = False, num_auto_dims: int = 2,
                 require_visual_sink: bool = True, **target):
        super().__init__(**target)
        if convention not in ("paper", "code"):
            raise ValueError(f"var: unknown convention {convention!r}; use 'paper' or 'code'")
        if queries not in ("text", "after_image", "all"):
            raise ValueError(f"var: unknown queries {queries!r}; use 'text', 'after_image' or 'all'")
        if not 0.0 <= p <= 1.0 or not 0.0 <= rho <= 1.0:
            raise ValueError(f"var: p and rho must lie in [0, 1], got p={p}, rho={rho}")
        if sink_dims is not None and sink_dims != "auto" and not (isinstance(sink_dims, (list, tuple)) and sink_dims):
            raise ValueError(f"var: sink_dims must be a non-empty list of hidden dimensions or 'auto', got {sink_dims!r}")
        self.p, self.rho, self.tau, self.min_image_mass = p, rho, tau, min_image_mass
        self.sink_dims = sink_dims if sink_dims in (None, "auto") else [int(d) for d in sink_dims]
        self.convention, self.queries = convention, queries
        self.first_layer, self.except_last_layer, self.num_auto_dims = first_layer, except_last_layer, num_auto_dims
        self.require_visual_sink = require_visual_sink
        self._num_layers = None
        self._sinks: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (sequence id, [B, T0] bool)
        self._auto_dims: tuple[int, torch.Tensor] | None = None  # (sequence id, [B, num_auto_dims]) this prefill's

    def setup(self, model) -> None:
        if self.sink_dims is None:
            raise ValueError("var needs the sink dimensions of this model's LLM: pass sink_dims (LLaVA-1.5-7B "
                             "[1415, 2533], LLaVA-1.5-13B [2100, 4743], Qwen2-VL-7B [458, 2570]; presets var-llava, "
                             "var-qwen2-vl) or sink_dims='auto' for attnkit's heuristic, which the paper does not have")
        self._num_layers = model.component(self.component or "text").num_layers
        hidden = getattr(model.text_config, "hidden_size", None)
        if hidden is not None and self.sink_dims != "auto" and max(self.sink_dims) >= hidden:
            raise ValueError(f"var: sink_dims {self.sink_dims} exceed the hidden size {hidden} of this model")
        self._sinks, self._auto_dims = {}, None

    # ---- sink detection (decoder-layer pre-hook, prefill only) -----------------------------------------------
    def install(self, handle) -> list:
        from attnkit.hooks.transformers import text_model_of

        decoder = text_model_of(handle.model)
        if decoder is None:
            raise ValueError("var: could not find the decoder layers of this model to read hidden states")
        self._handle = handle
        return [handle.hook(layer, self._make_hook(i), pre=True, with_kwargs=True)
                for i, layer in enumerate(decoder.layers)]

    def _sink_layer(self, layer: int) -> bool:
        last = self._num_layers - 1 if self._num_layers else None
        return layer >= self.first_layer and not (self.except_last_layer and layer == last)

    def _make_hook(self, layer: int):
        def hook(module, args, kwargs):
            handle, tracker = self._handle, self._handle.tracker
            if not handle.active or not tracker.last_was_prefill or tracker.ids is None:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)  # [B, N, D]
            if hidden is None or not self._sink_layer(layer):
                self._sinks.pop(layer, None)
                return None
            real = tracker.mask("real")
            real = real if real.shape == hidden.shape[:2] else None
            dims = self.sink_dims if self.sink_dims != "auto" else self._dims_for(hidden, real, tracker.sequence_id)
            sinks = massive_activation_sinks(hidden.detach(), dims, self.tau, real)  # [B, N]
            self._sinks[layer] = (tracker.sequence_id, sinks.cpu())
            return None

        return hook

    def _dims_for(self, hidden: torch.Tensor, real, sequence: int) -> torch.Tensor:
        """``sink_dims="auto"``: per sample, the dimensions with the largest normalised activation in the first sink
        layer's input of this prefill → long ``[B, num_auto_dims]`` (recomputed for every new sequence)."""
        if self._auto_dims is None or self._auto_dims[0] != sequence:
            dims = torch.stack([torch.tensor(top_activation_dims(hidden[b:b + 1].detach(), self.num_auto_dims,
                                                                 None if real is None else real[b:b + 1]))
                                for b in range(hidden.shape[0])])  # [B, num_auto_dims]
            self._auto_dims = (sequence, dims)
        return self._auto_dims[1]

    @property
    def last_auto_dims(self) -> torch.Tensor | None:
        """``[B, num_auto_dims]``: the dimensions ``sink_dims="auto"`` chose at the last prefill (None otherwise)."""
        return None if self._auto_dims is None else self._auto_dims[1]

    def sink_mask(self, ctx) -> torch.Tensor:
        """Bool ``[B, K]``: the sink tokens of this layer among this call's keys (False for generated tokens)."""
        seq, sinks = self._sinks.get(ctx.layer, (None, None))
        out = torch.zeros(ctx.batch, ctx.tracker.length, dtype=torch.bool)
        if sinks is not None and seq == ctx.tracker.sequence_id and sinks.shape[0] == ctx.batch:
            n = min(sinks.shape[1], out.shape[1])
            out[:, :n] = sinks[:, :n]
        return ctx.keys_of(out).to(ctx.device)  # [B, K]

    def visual_sink_mask(self, ctx) -> torch.Tensor:
        return self.sink_mask(ctx) & ctx.key_mask("image")

    def has_visual_sink(self, ctx) -> torch.Tensor:
        """Bool ``[B]``: whether this layer found any visual sink in the sample's prompt (at the prefill)."""
        seq, sinks = self._sinks.get(ctx.layer, (None, None))
        if sinks is None or seq != ctx.tracker.sequence_id or sinks.shape[0] != ctx.batch:
            return torch.zeros(ctx.batch, dtype=torch.bool, device=ctx.device)
        image = ctx.tracker.mask("image")[:, : sinks.shape[1]]  # [B, T0]
        return (sinks[:, : image.shape[1]] & image).any(1).to(ctx.device)

    def key_groups(self):
        # group 1 = visual sinks, 2 = other (text) sinks, 3 = non-sink image tokens, 0 = everything else
        return (self.visual_sink_mask, self.sink_mask, "image")

    # ---- the rule -----------------------------------------------------------------------------------------------
    def _query_rows(self, ctx) -> torch.Tensor:
        """Bool ``[B, Q]``: rows that may be redistributed."""
        if self.queries == "all" or (not ctx.is_prefill and ctx.q_len == 1):
            return torch.ones(ctx.batch, ctx.q_len, dtype=torch.bool, device=ctx.device)
        if self.queries == "text":
            return ctx.query_mask("text")
        image = ctx.tracker.mask("image")  # [B, T]
        pos = torch.arange(image.shape[1])
        last_image = torch.where(image, pos, torch.full_like(pos, -1)).amax(1)  # [B]
        q_pos = pos[ctx._positions(ctx.q_len)]  # [Q]
        if ctx.query_rows is not None:
            q_pos = q_pos[ctx.query_rows.cpu()]
        return (q_pos[None, :] > last_image[:, None]).to(ctx.device)  # [B, Q]

    def group_factors(self, mass: torch.Tensor, ctx) -> torch.Tensor:  # mass [B, H, Q, 4]
        groups = mass.shape[-1]  # the eager backend drops trailing empty groups
        mass = torch.nn.functional.pad(mass, (0, 4 - groups)) if groups < 4 else mass  # [B, H, Q, 4]
        n_image = ctx.key_mask("image").sum(-1).float()[:, None, None]  # [B, 1, 1]
        visual = self.has_visual_sink(ctx)[:, None, None] if self.require_visual_sink else None  # [B, 1, 1]
        factors = var_factors(mass, self.p, self.rho, self.min_image_mass, self.convention, n_image,
                              visual)  # [B, H, Q, 4]
        factors = factors[..., :groups]
        rows = self._query_rows(ctx)[:, None, :, None]  # [B, 1, Q, 1]
        return torch.where(rows, factors, torch.ones_like(factors))
