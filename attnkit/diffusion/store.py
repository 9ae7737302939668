"""An attention store: record queries, keys, values or attention maps during one pass (usually a DDIM inversion)
for another pass to inject.

:class:`AttentionStore` is an intervention (``attention-store``) that changes nothing: its ``edit_kv`` hook copies
the call's q/k/v (after the processor's projections, norms and RoPE, head-split ``[B, H, N, D]``) and, when
``"maps"`` is asked for, its ``edit_probs`` hook copies the probabilities ``[B, H, Q, K]`` (the only N² tensor, and
only where asked). Entries are keyed by ``(module name, timestep)`` — the scheduler timestep the denoiser was called
with, never a call counter, so classifier-free guidance or extra passes cannot misalign them.

What to keep: ``modules`` (a regex on attention module names, e.g. ``r"up_blocks\\.[23].*attn1"``), ``layers`` (site
indices), ``kinds`` (``"self"``, ``"cross"``, ``"joint"``), ``tensors`` (any of ``q``, ``k``, ``v``, ``maps``),
``timesteps`` (None = every call), ``rows`` (batch rows, None = all), ``heads`` (None = all), ``max_queries``
(skip calls with more queries, e.g. FateZero's ≤ 32² layers). ``dtype`` (e.g. ``torch.float16``) and
``offload="cpu"`` shrink or move what is kept; :meth:`AttentionStore.memory` reports the bytes held.

Example (record the self-attention keys of a tiny UNet during a 2-step DDIM inversion):
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_pipeline
    >>> from attnkit.diffusion.inversion import ddim_invert
    >>> pipe = tiny_pipeline("sd")
    >>> store = AttentionStore(tensors=("k",), kinds=("self",), modules=r"up_blocks")
    >>> inv = ddim_invert(pipe, torch.zeros(1, 4, 8, 8), num_inference_steps=2, record=store)
    >>> store.timesteps(), store.modules()
    ([1, 51], ['up_blocks.1.attentions.0.transformer_blocks.0.attn1', 'up_blocks.1.attentions.1.transformer_blocks.0.attn1'])
    >>> store.get('up_blocks.1.attentions.0.transformer_blocks.0.attn1', 51, "k").shape   # [B, H, N, D]
    torch.Size([1, 8, 64, 4])
    >>> store.memory()["bytes"]          # 2 modules x 2 timesteps x 1·8·64·4 fp32 values
    32768
"""

from __future__ import annotations

import re

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.targets import Target, parse_layers

TENSORS = ("q", "k", "v", "maps")
KINDS = ("self", "cross", "joint")


def timestep_key(t) -> float | int:
    """The key of a scheduler timestep: an int for integer timesteps, else rounded to 1e-3 (flow-matching σ·1000).

    Example:
        >>> timestep_key(981.0), timestep_key(21.387756)
        (981, 21.388)
    """
    value = round(float(t), 3)
    return int(value) if value.is_integer() else value


@register_intervention
class AttentionStore(Intervention):
    name = "attention-store"
    description = "record q/k/v (and optionally attention maps) per module and timestep for later injection"
    requires = frozenset({"denoiser"})
    #: a recorder changes nothing: its "active" setting (recording everything) must still be exactly the stock model,
    #: which the neutral cell checks; the other invariants run with it too
    conformance = {"neutral": {"tensors": ("q", "k", "v", "maps"), "kinds": ("self", "cross", "joint")},
                   "active": {"tensors": ("q", "k", "v", "maps"), "kinds": ("self", "cross", "joint")}}

    def __init__(self, tensors=("q", "k", "v"), kinds=("self",), timesteps=None, rows=None, heads=None,
                 max_queries: int | None = None, dtype: torch.dtype | str | None = None, offload: str | None = None,
                 **target):
        unknown = [t for t in tensors if t not in TENSORS]
        if unknown or not tensors:
            raise ValueError(f"attention-store: tensors must be some of {TENSORS}, got {tuple(tensors)!r}")
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"attention-store: kinds must be some of {KINDS}, got {tuple(kinds)!r}")
        super().__init__(**target)  # every head runs the hooks; ``heads`` selects what is kept
        self.heads_kept = None if heads is None else ([heads] if isinstance(heads, int) else list(heads))
        self.tensors, self.kinds = tuple(tensors), tuple(kinds)
        self.timesteps_kept = None if timesteps is None else {timestep_key(t) for t in timesteps}
        self.rows = None if rows is None else list(rows)
        self.max_queries, self.offload = max_queries, offload
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.data: dict = {}  # (module, timestep key) -> {tensor name: tensor}
        self._names: list[str] = []
        self._kinds: list[str] = []

    # ---- planning --------------------------------------------------------------------------------------------
    def capabilities(self) -> set[str]:
        return {"edit_kv"} | ({"edit_probs"} if "maps" in self.tensors else set())

    def setup(self, model) -> None:
        """Keep the layers of the wanted kinds (and layers / modules given)."""
        component = model.component(self.component)
        self._names, self._kinds = list(component.names), list(component.kinds)
        layers = [i for i, kind in enumerate(component.kinds) if kind in self.kinds]
        if self.target.layers is not None:
            explicit = set(parse_layers(self.target.layers, component.num_layers))
            layers = [i for i in layers if i in explicit]
        if self.target.modules is not None:
            layers = [i for i in layers if re.search(self.target.modules, component.names[i])]
        if not layers:
            raise ValueError(f"attention-store: no {'/'.join(self.kinds)} attention module matches layers="
                             f"{self.target.layers!r} modules={self.target.modules!r}")
        self.target = Target(layers=layers, heads=None, modules=None)

    # ---- recording -------------------------------------------------------------------------------------------
    def _wanted(self, ctx) -> bool:
        if ctx.timestep is None:
            return False
        if self.max_queries is not None and ctx.q_len > self.max_queries:
            return False
        return self.timesteps_kept is None or timestep_key(ctx.timestep) in self.timesteps_kept

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        """Rows and heads kept, detached, in the store's dtype and device. x: [B, H, N, ·]."""
        if self.rows is not None:
            x = x[self.rows]
        if self.heads_kept is not None:
            x = x[:, self.heads_kept]
        x = x.detach()
        if self.dtype is not None:
            x = x.to(self.dtype)
        if self.offload is not None:
            x = x.to(self.offload, non_blocking=True)
        return x.clone()  # never a view of the live call's buffers

    def _slot(self, ctx) -> dict:
        return self.data.setdefault((self._names[ctx.layer], timestep_key(ctx.timestep)), {})

    def edit_kv(self, q, k, v, ctx):
        """Record; change nothing. q [B,H,Q,D], k/v [B,Hkv,K,D]."""
        if self._wanted(ctx):
            slot = self._slot(ctx)
            for name, x in (("q", q), ("k", k), ("v", v)):
                if name in self.tensors:
                    slot[name] = self._keep(x)
        return None

    def edit_probs(self, probs, ctx):
        """Record the maps ``[B, H, Q, K]``; change nothing."""
        if self._wanted(ctx):
            self._slot(ctx)["maps"] = self._keep(probs)
        return probs

    # ---- reading ---------------------------------------------------------------------------------------------
    def get(self, module: str, timestep, tensor: str) -> torch.Tensor:
        """The stored ``tensor`` of ``module`` at ``timestep``; KeyError with one sentence when absent."""
        slot = self.data.get((module, timestep_key(timestep)))
        if slot is None or tensor not in slot:
            have = sorted({t for (m, t) in self.data if m == module})
            raise KeyError(f"attention-store has no {tensor!r} for {module} at timestep {timestep_key(timestep)} "
                           f"(stored timesteps there: {have or 'none'}); record it with the same schedule")
        return slot[tensor]

    def has(self, module: str, timestep) -> bool:
        return (module, timestep_key(timestep)) in self.data

    def timesteps(self) -> list:
        """Stored timestep keys, ascending."""
        return sorted({t for (_, t) in self.data})

    def modules(self) -> list[str]:
        """Stored module names, in model order."""
        names = {m for (m, _) in self.data}
        order = {n: i for i, n in enumerate(self._names)}
        return sorted(names, key=lambda n: order.get(n, len(order)))

    def clear(self) -> None:
        self.data.clear()

    def memory(self) -> dict:
        """``{"bytes": total, "by_tensor": {name: bytes}, "entries": n, "timesteps": n, "modules": n, "device": …}``."""
        by_tensor: dict[str, int] = {}
        devices = set()
        for slot in self.data.values():
            for name, x in slot.items():
                by_tensor[name] = by_tensor.get(name, 0) + x.numel() * x.element_size()
                devices.add(str(x.device))
        return {"bytes": sum(by_tensor.values()), "by_tensor": by_tensor, "entries": len(self.data),
                "timesteps": len(self.timesteps()), "modules": len(self.modules()), "device": sorted(devices)}

    def __repr__(self) -> str:
        mem = self.memory()
        return (f"<AttentionStore {'/'.join(self.tensors)}: {mem['modules']} modules x {mem['timesteps']} timesteps, "
                f"{mem['bytes'] / 2**20:.2f} MiB on {', '.join(mem['device']) or '-'}>")
