"""Backend registry and selection: ``eager`` (reference), ``torch`` (CPU/GPU, no N² for structured edits),
``triton`` (GPU, fused; registered when available).

``choose_backend("auto", needs, device)`` picks the fastest backend that supports every capability the layer's
interventions need; an explicit choice that cannot work raises naming the intervention and the missing capability.

Example:
    >>> choose_backend("auto", {"edit_output": ["gain"]}, "cpu").name
    'torch'
    >>> choose_backend("auto", {"edit_probs": ["var"]}, "cpu").name
    'eager'
    >>> choose_backend("auto", {"group_factors": ["act"]}, "cpu").name
    'torch'
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from attnkit.kernels import eager, torch_path
from attnkit.registry import Registry

BACKENDS = Registry("backend")
AUTO_ORDER = ("triton", "torch", "eager")


@dataclass
class Backend:
    name: str
    capabilities: frozenset
    attention: Callable  # (q, k, v, mask, *, scaling, entries, make_ctx, causal, softcap, dropout) -> out | (out, probs)
    available: Callable[[str], str | None] = lambda device: None  # returns a reason when unusable on `device`
    returns_probs: bool = False
    unsupported_combinations: tuple = ()  # capability sets that cannot share one layer

    def supports(self, needs) -> bool:
        caps = set(needs)
        return caps <= self.capabilities and not any(combo <= caps for combo in self.unsupported_combinations)

    def run(self, *args, **kwargs):
        result = self.attention(*args, **kwargs)
        return result[0] if self.returns_probs else result


BACKENDS.register("eager", Backend("eager", eager.CAPABILITIES, eager.eager_attention, returns_probs=True))
BACKENDS.register("torch", Backend("torch", torch_path.CAPABILITIES, torch_path.torch_attention,
                                   unsupported_combinations=torch_path.UNSUPPORTED_COMBINATIONS))



def _triton_unavailable(device_type: str) -> str | None:
    from attnkit.kernels.triton import triton_available

    if not triton_available():
        return "triton is not installed or there is no CUDA device (TRITON_INTERPRET=1 runs its CPU interpreter)"
    return None


#: Triton: group partials in one fused pass per group; plain attention stays on PyTorch's fused SDPA kernels.
BACKENDS.register("triton", Backend(
    "triton", frozenset({"query_scale", "group_factors", "key_stats", "edit_output"}),
    functools.partial(torch_path.torch_attention, kernel="triton"), available=_triton_unavailable))


def choose_backend(requested: str, needs: dict[str, list[str]], device) -> Backend:
    """Pick a backend. ``needs`` maps capability → names of the interventions that need it."""
    device_type = getattr(device, "type", str(device))
    if requested != "auto":
        backend = BACKENDS.get(requested)
        missing = {cap: names for cap, names in needs.items() if cap not in backend.capabilities}
        for combo in backend.unsupported_combinations:
            if combo <= set(needs):
                missing.update({cap: needs[cap] for cap in combo})
        if missing:
            detail = "; ".join(f"{', '.join(sorted(set(n)))} needs '{cap}'" for cap, n in missing.items())
            raise ValueError(f"backend {requested!r} cannot run this recipe: {detail}. Use backend='auto' or 'eager'.")
        reason = backend.available(device_type)
        if reason:
            raise ValueError(f"backend {requested!r} is unavailable on {device_type}: {reason}")
        return backend
    for name in AUTO_ORDER:
        if name not in BACKENDS:
            continue
        backend = BACKENDS.get(name)
        if name == "triton" and device_type != "cuda":
            continue  # the interpreter is for tests, never an automatic choice
        if backend.supports(needs) and backend.available(device_type) is None:
            return backend
    raise ValueError(f"no backend supports {sorted(needs)} on {device_type}")
