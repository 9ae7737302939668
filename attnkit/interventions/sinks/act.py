"""ACT — Attention Calibration Technique (Yu et al., ICML 2024), METHODS.md §2.

Per (layer, head) a sink set Ŝ is found at prefill from column scores (mean attention a key receives from the
queries that see it); then in every row the sinks keep ``beta`` of their attention and the freed mass
``(1−β)·Σ_Ŝ A`` goes back to the non-sink keys in proportion. Ŝ is fixed at prefill and applied to every decoding
row (METHODS.md's recommendation; the released code only ever runs prefill).

The calibration is a group reweighting (:meth:`group_factors`). Sink sets differ per head, so keys are grouped by
their *head-membership pattern* (which of this layer's target heads call the key a sink): at most ``max_patterns``
groups, usually a handful. Detection needs the column statistics of the prefill attention, which every backend
hands to :meth:`key_stats` (the fused ones compute them from q and k without the ``[Q, K]`` matrix).

Defaults (code vs paper):
  * ``sink_test="code"``: ``c_j > theta`` with θ = 0.1 (released code); ``"paper"``: ``c_j > alpha/N``, α = 5 [2nd].
  * ``drop_first="detected"``: the first detected sink of each head is dropped (code ``indices[1:]``);
    ``"token"`` spares only the first token; ``"none"``.
  * β = 0.4; layers are chosen by the recipe (code: 2..L−2, see the ``act-llama`` preset); heads by the
    calibration sweep (:mod:`attnkit.interventions.calibration.act_select`).

Example (METHODS.md calibration example, Ŝ = {3}, β = 0.4):
    >>> import torch
    >>> A = torch.tensor([0.30, 0.10, 0.10, 0.30, 0.10, 0.10])
    >>> sink = torch.tensor([False, False, False, True, False, False])
    >>> [round(x, 6) for x in act_calibrate_row(A, sink, beta=0.4).tolist()]
    [0.377143, 0.125714, 0.125714, 0.12, 0.125714, 0.125714]
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.sinks.detect import act_sinks_from_columns


def act_calibrate_row(probs: torch.Tensor, sinks: torch.Tensor, beta: float = 0.4) -> torch.Tensor:
    """Reference rule on materialised rows ``[..., K]`` with a sink mask broadcastable to it.

    The non-sink mass is summed over the non-sink keys, never taken as "total − sink mass": when sinks hold almost
    all of a row (1 − 1e-7) the difference would keep no correct digit in fp32."""
    probs = probs.float()
    sinks = sinks.to(torch.bool)
    sink_mass = (probs * sinks).sum(-1, keepdim=True)  # [..., 1]
    rest = (probs * ~sinks).sum(-1, keepdim=True)  # [..., 1]
    budget = (1.0 - beta) * sink_mass
    calibrated = torch.where(sinks, beta * probs, probs + budget * probs / rest.clamp_min(1e-30))
    return torch.where(rest > 0, calibrated, probs)


def act_factors(mass: torch.Tensor, sink_groups: torch.Tensor, beta: float) -> torch.Tensor:
    """Factors ``[B, H, Q, G]`` from masses ``[B, H, Q, G]`` and ``sink_groups`` bool ``[B, H, G]`` (group g is a sink
    group for head h). Sinks ×β, other groups ×(1 + (1−β)S/R) with S the sink mass and R the non-sink mass, so
    ``Σ M_g c_g = S + R``. R is the sum of the non-sink groups and the factor is written without "1 − S": both
    would cancel catastrophically when sinks take almost all of a row.

    Example (sinks hold 1 − 1e-7 of the row; the 1e-7 left must grow to 1e-7 + 0.6·(1 − 1e-7)):
        >>> mass = torch.tensor([1e-7, 1 - 1e-7]).view(1, 1, 1, 2)
        >>> f = act_factors(mass, torch.tensor([[[False, True]]]), beta=0.4)
        >>> round(float(f[..., 0] * mass[..., 0]), 7), round(float(f[..., 1] * mass[..., 1]), 7)
        (0.6000001, 0.3999999)
    """
    return _factors(mass, _sink_split(sink_groups), beta)


def _sink_split(sink_groups: torch.Tensor) -> torch.Tensor:
    """``[B, H, G, 2]`` fp32 from ``sink_groups`` bool ``[B, H, G]``: column 0 selects the sink groups, column 1 the
    others, so that ``mass @ split`` is ``(S, R)``, each summed over its own groups only."""
    return torch.stack([sink_groups, ~sink_groups], dim=-1).float()


def _factors(mass: torch.Tensor, split: torch.Tensor, beta: float) -> torch.Tensor:
    """:func:`act_factors` from the groups' split (:func:`_sink_split`), which a layer computes once."""
    split = split[:, :, : mass.shape[-1]]  # [B, H, G, 2]
    sums = torch.matmul(mass, split)  # [B, H, Q, 2]: (S, R)
    s, rest = sums[..., :1], sums[..., 1:]
    other = s.div(rest.clamp_min(1e-30)).mul_(1.0 - beta).add_(1.0)  # [B, H, Q, 1]
    factors = torch.where(split[:, :, None, :, 0] > 0, beta, other)  # [B, H, Q, G]
    return torch.where((rest > 1e-12) & (s > 0), factors, 1.0)


@register_intervention
class ACT(Intervention):
    name = "act"
    conformance = {
        "neutral": {"beta": 1.0}, "active": {"beta": 0.4, "alpha": 1.5},
        "not_applicable": {"generate": "sinks are detected at the prefill and kept for the decode steps (the released "
                                       "code's KV-cache behaviour): recomputing from scratch detects them again"},
        # the factor 1 + (1 - beta) S / R divides by the non-sink mass R, which is ~1e-3 where sinks take almost all
        # attention: float32 rounding differences between a padded batch and a lone sample (~2e-6 of the logit
        # scale in the stock model) grow by 1/R (measured on SmolLM2: up to 1.1e-4 of the logit scale)
        "tolerance": {"batched": 5e-4}}
    requires = frozenset({"text_decoder"})
    description = "Attention Calibration Technique: scale hidden attention sinks by beta, give the mass back"

    def __init__(self, beta: float = 0.4, sink_test: str = "code", theta: float = 0.1, alpha: float = 5.0,
                 drop_first: str = "detected", max_patterns: int = 32, **target):
        super().__init__(**target)
        if sink_test not in ("code", "paper"):
            raise ValueError(f"act: unknown sink_test {sink_test!r}; use 'code' or 'paper'")
        if drop_first not in ("detected", "token", "none"):
            raise ValueError(f"act: unknown drop_first {drop_first!r}; use 'detected', 'token' or 'none'")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"act: beta must lie in [0, 1], got {beta}")
        self.beta, self.sink_test, self.theta, self.alpha = beta, sink_test, theta, alpha
        self.drop_first, self.max_patterns = drop_first, max_patterns

    # ---- detection at prefill (needs the prefill probabilities) ----------------------------------------------
    def key_stats(self, col_mass: torch.Tensor, ctx) -> None:  # [B, H, K] from the prefill's real queries
        if not ctx.is_prefill or ctx.q_len != ctx.k_len:
            return  # Ŝ is fixed at prefill and reused by every decoding row
        real = ctx.key_mask("real") if ctx.tracker is not None else None  # [B, K]
        sinks = act_sinks_from_columns(col_mass, real, test=self.sink_test, theta=self.theta, alpha=self.alpha,
                                       drop_first=self.drop_first)  # [B, H, K]
        sinks &= ctx.heads.to(sinks.device)[None, :, None]
        self._store_patterns(sinks.cpu(), ctx)

    def _store_patterns(self, sinks: torch.Tensor, ctx) -> None:
        """Group keys by which heads call them sinks. sinks [B, H, T0] → slot per key [B, T0], heads per slot."""
        batch, num_heads, length = sinks.shape
        weights = 2 ** torch.arange(num_heads, dtype=torch.long)  # head bit weights
        codes = (sinks.long() * weights[None, :, None]).sum(1)  # [B, T0]
        slot = torch.zeros(batch, length, dtype=torch.long)
        slot_heads = torch.zeros(batch, num_heads, self.max_patterns + 1, dtype=torch.bool)  # [B, H, G]
        for b in range(batch):
            patterns = [int(c) for c in torch.unique(codes[b]).tolist() if c != 0]
            if len(patterns) > self.max_patterns:
                raise ValueError(f"act: layer {ctx.layer} has {len(patterns)} distinct sink patterns across heads; "
                                 f"raise max_patterns (now {self.max_patterns}) or target fewer heads")
            for i, code in enumerate(patterns, start=1):
                slot[b][codes[b] == code] = i
                slot_heads[b, :, i] = (code & weights) != 0
        ctx.state["act_slot"] = slot
        ctx.state["act_slot_heads"] = slot_heads
        ctx.state["act_split"] = _sink_split(slot_heads)  # [B, H, G, 2]

    def sinks(self, ctx) -> torch.Tensor | None:
        """The detected sink set of this layer as bool ``[B, H, T0]`` (prefill positions), or None."""
        slot, heads = ctx.state.get("act_slot"), ctx.state.get("act_slot_heads")
        if slot is None:
            return None
        return torch.gather(heads, 2, slot[:, None, :].expand(-1, heads.shape[1], -1))  # [B, H, T0]

    # ---- the rule -------------------------------------------------------------------------------------------
    def wants_key_stats(self, ctx) -> bool:
        return ctx.is_prefill and ctx.q_len == ctx.k_len  # Ŝ is fixed at prefill: no column pass while decoding

    def key_groups(self):
        """One group per head pattern (slot 1 … ``max_patterns``); :meth:`key_group_ids` gives all of them at once."""
        if not hasattr(self, "_groups"):
            self._groups = tuple(self._slot_mask(i) for i in range(1, self.max_patterns + 1))
        return self._groups

    def key_group_ids(self, ctx) -> torch.Tensor:
        """``[B, K]``: the pattern slot of each key (0: no head calls it a sink; keys after the prefill are 0)."""
        slot = ctx.state.get("act_slot")  # [B, T0]
        if slot is None or slot.shape[0] != ctx.batch:
            return torch.zeros(ctx.batch, ctx.k_len, dtype=torch.long, device=ctx.device)
        return ctx.keys_of(self._tracked_slots(ctx, slot, ctx.tracker.length))

    @staticmethod
    def _tracked_slots(ctx, slot: torch.Tensor, length: int) -> torch.Tensor:
        """The slots of the first ``length`` tracked positions ``[B, length]`` on the call's device (0 after the
        prefill's ``T0``): a view of a buffer kept in ``ctx.state`` beside the prefill's ``slot`` it was built from
        (a new prefill's slot builds a new one), doubled when the sequence outgrows it, so a decoding step neither
        pads nor copies."""
        built_from, device, buf = ctx.state.get("act_slot_buffer") or (None, None, None)
        if built_from is not slot or device != str(ctx.device) or buf.shape[1] < length:
            capacity = max(length, 2 * slot.shape[1], 2 * (0 if buf is None else buf.shape[1]))
            buf = torch.zeros(slot.shape[0], capacity, dtype=slot.dtype, device=ctx.device)  # [B, capacity]
            buf[:, : slot.shape[1]] = slot.to(ctx.device)
            ctx.state["act_slot_buffer"] = (slot, str(ctx.device), buf)
        return buf[:, :length]

    def _slot_mask(self, i: int):
        def mask(ctx) -> torch.Tensor:  # [B, K]
            return self.key_group_ids(ctx) == i

        return mask

    def group_factors(self, mass: torch.Tensor, ctx) -> torch.Tensor:  # mass [B, H, Q, G]
        split = ctx.state.get("act_split")  # [B, H, G, 2]
        if split is None:
            return torch.ones_like(mass)
        return _factors(mass, split.to(mass.device), self.beta)
