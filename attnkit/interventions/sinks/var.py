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

Other defaults: τ = 20 (strict ``>``), sinks only in layers ≥ 2 (code ``range(L)[2:]``), last layer excluded
(``except_last_layer=True``, the paper; the released code's flag is shadowed so it modifies the last layer — set
False to match it), text query rows only (``queries="text"``, paper; ``"after_image"`` = the code's prefill filter,
``"all"``). Sinks are detected at prefill and reused while decoding; each new row is re-tested at every step.
Sink dimensions: pass the model's (LLaVA-1.5-7B: [1415, 2533], Qwen2-VL-7B: [458, 2570]) or ``"auto"`` — an attnkit
extension that picks the ``num_auto_dims`` dimensions with the largest normalised activation at the first prefill.

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
                convention: str = "paper", n_image: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Group factors ``[..., 4]`` from group masses ``[..., 4]`` (other, visual sink, text sink, image non-sink).

    Factors sum to one with the masses (``Σ M_g c_g = 1``), so they are exact with or without renormalisation."""
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
    budget = recycled * (m_vs + m_ts)  # Ω
    factors = torch.ones_like(mass)
    factors[..., VSINK] = 1.0 - recycled
    factors[..., TSINK] = 1.0 - recycled
    factors[..., IMAGE] = 1.0 + budget / m_img.clamp_min(1e-30)
    return torch.where(qualifies[..., None], factors, torch.ones_like(factors))


@register_intervention
class VAR(Intervention):
    name = "var"
    conformance = {"neutral": {"p": 0.0}, "active": {"p": 0.6, "first_layer": 0, "except_last_layer": False}}
    requires = frozenset({"text_decoder", "image_tokens"})
    description = "Visual Attention Redistribution: recycle sink attention to non-sink image tokens"

    def __init__(self, p: float = 0.4, rho: float = 0.5, tau: float = 20.0, sink_dims: list | str = "auto",
                 min_image_mass: float = 0.2, convention: str = "paper", queries: str = "text",
                 first_layer: int = 2, except_last_layer: bool = True, num_auto_dims: int = 2, **target):
        super().__init__(**target)
        if convention not in ("paper", "code"):
            raise ValueError(f"var: unknown convention {convention!r}; use 'paper' or 'code'")
        if queries not in ("text", "after_image", "all"):
            raise ValueError(f"var: unknown queries {queries!r}; use 'text', 'after_image' or 'all'")
        if not 0.0 <= p <= 1.0 or not 0.0 <= rho <= 1.0:
            raise ValueError(f"var: p and rho must lie in [0, 1], got p={p}, rho={rho}")
        if sink_dims != "auto" and not (isinstance(sink_dims, (list, tuple)) and sink_dims):
            raise ValueError(f"var: sink_dims must be 'auto' or a non-empty list of hidden dimensions, got {sink_dims!r}")
        self.p, self.rho, self.tau, self.min_image_mass = p, rho, tau, min_image_mass
        self.sink_dims = sink_dims if sink_dims == "auto" else [int(d) for d in sink_dims]
        self.convention, self.queries = convention, queries
        self.first_layer, self.except_last_layer, self.num_auto_dims = first_layer, except_last_layer, num_auto_dims
        self._num_layers = None
        self._sinks: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (sequence id, [B, T0] bool)
        self._auto_dims: list[int] | None = None

    def setup(self, model) -> None:
        self._num_layers = model.component(self.component or "text").num_layers
        hidden = getattr(model.text_config, "hidden_size", None)
        if hidden is not None and self.sink_dims != "auto" and max(self.sink_dims) >= hidden:
            raise ValueError(f"var: sink_dims {self.sink_dims} exceed the hidden size {hidden} of this model")

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
            dims = self.sink_dims
            if dims == "auto":
                if self._auto_dims is None:
                    self._auto_dims = top_activation_dims(hidden.detach(), self.num_auto_dims, real)
                dims = self._auto_dims
            sinks = massive_activation_sinks(hidden.detach(), dims, self.tau, real)  # [B, N]
            self._sinks[layer] = (tracker.sequence_id, sinks.cpu())
            return None

        return hook

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
        factors = var_factors(mass, self.p, self.rho, self.min_image_mass, self.convention, n_image)  # [B,H,Q,4]
        factors = factors[..., :groups]
        rows = self._query_rows(ctx)[:, None, :, None]  # [B, 1, Q, 1]
        return torch.where(rows, factors, torch.ones_like(factors))
