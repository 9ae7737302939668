"""The one list of attention backends: names, what each can run, and how ``auto`` chooses.

* ``eager`` — the reference: materialises scores and probabilities ``[B,H,Q,K]`` and applies every hook literally.
* ``torch`` — CPU/GPU, no ``[Q, K]`` matrix for structured edits (fused SDPA, span decomposition, query chunks).
* ``triton`` — GPU fused kernels for group partials, group biases and key statistics (CPU only through the
  interpreter, never chosen automatically there).

Every backend runs the model's own attention mask exactly (bidirectional image blocks, prefix, chunked and sliding
masks, padding): the fused ones take a fast path only when the mask provably has the standard causal + padding
(+ window) structure and otherwise slice the given mask per query chunk (:mod:`attnkit.kernels.masks`). The
``mask`` capability records that contract; a backend without it would never be picked for a layer.

``choose_backend("auto", needs, device)`` picks the first backend of :data:`BACKEND_NAMES` that supports every
capability the layer's interventions need; an explicit choice that cannot work raises naming the intervention and
the missing capability. The kernel functions' ``backend=`` arguments (``grouped.group_partials`` …) take the same
names (:func:`kernel_name`). This module imports no kernel at import time, so every kernel module may import it.

Example:
    >>> choose_backend("auto", {"edit_output": ["gain"]}, "cpu").name
    'torch'
    >>> choose_backend("auto", {"edit_probs": ["var"]}, "cpu").name
    'eager'
    >>> choose_backend("auto", {"group_factors": ["act"]}, "cpu").name
    'torch'
    >>> kernel_name("torhc")
    Traceback (most recent call last):
    ...
    ValueError: unknown backend 'torhc'; did you mean 'torch'? Choose one of triton, torch, eager
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Callable

from attnkit.registry import Registry

#: every backend, in the order ``auto`` prefers them (fastest first); the only place backend names are declared
BACKEND_NAMES = ("triton", "torch", "eager")
#: what a recipe may ask for
REQUESTABLE = ("auto",) + BACKEND_NAMES

#: hooks that run before every backend (the adapters apply them to q/k/v and to the mask first,
#: :mod:`attnkit.hooks.kv_edit`, :mod:`attnkit.hooks.mask_edit`), so every backend supports them
PRE_BACKEND_CAPABILITIES = frozenset({"edit_kv", "override_mask"})
#: hooks (see :mod:`attnkit.interventions.base`) plus ``softcap`` (logit soft-capping), ``probs`` (returns the
#: probability matrix) and ``mask`` (runs any attention mask the model builds, exactly)
EAGER_CAPABILITIES = frozenset({"query_scale", "score_bias", "edit_scores", "key_stats", "group_factors",
                                "edit_probs", "edit_output", "softcap", "probs", "mask"}) | PRE_BACKEND_CAPABILITIES
TORCH_CAPABILITIES = frozenset({"query_scale", "score_bias", "edit_output", "group_factors", "key_stats",
                                "mask"}) | PRE_BACKEND_CAPABILITIES
TRITON_CAPABILITIES = frozenset({"query_scale", "group_factors", "key_stats", "edit_output",
                                 "mask"}) | PRE_BACKEND_CAPABILITIES
#: capability pairs the fused backends cannot combine in one layer (an arbitrary score bias breaks group partials
#: and the key statistics, which are computed from q and k)
FUSED_UNSUPPORTED = (frozenset({"score_bias", "group_factors"}), frozenset({"score_bias", "key_stats"}))

BACKENDS = Registry("backend")


def kernel_name(name: str) -> str:
    """Validate a backend name given to a kernel function; raises ``ValueError`` with a suggestion."""
    if name in BACKEND_NAMES:
        return name
    close = difflib.get_close_matches(str(name), BACKEND_NAMES, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown backend {name!r}{hint} Choose one of {', '.join(BACKEND_NAMES)}")


def _resolve(path: str) -> Callable:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class Backend:
    name: str
    capabilities: frozenset
    #: "module:function" of ``(q, k, v, mask, *, scaling, entries, make_ctx, causal, softcap, dropout)`` → out or
    #: (out, probs); imported on first use so that this module stays free of kernel imports
    function: str
    available: Callable[[str], str | None] = lambda device: None  # returns a reason when unusable on `device`
    returns_probs: bool = False
    unsupported_combinations: tuple = ()  # capability sets that cannot share one layer
    kwargs: tuple = ()  # extra keyword arguments for the function, as (name, value) pairs
    auto_on_cpu: bool = True  # may ``auto`` pick it on a CPU device

    def supports(self, needs) -> bool:
        caps = set(needs)
        return caps <= self.capabilities and not any(combo <= caps for combo in self.unsupported_combinations)

    @property
    def attention(self) -> Callable:
        return _resolve(self.function)

    def run(self, *args, rows=None, **kwargs):
        """The attention output ``[B,H,Q,D]``; with ``rows`` (query indices) also the edited probabilities of
        those rows ``[B,H,R,K]``, taken from the same computation: ``(out, probs)``."""
        if rows is None:
            result = self.attention(*args, **kwargs, **dict(self.kwargs))
            return result[0] if self.returns_probs else result
        return self.attention(*args, rows=rows, **kwargs, **dict(self.kwargs))


def _triton_unavailable(device_type: str) -> str | None:
    from attnkit.kernels.triton import triton_available

    if not triton_available():
        return "triton is not installed or there is no CUDA device (TRITON_INTERPRET=1 runs its CPU interpreter)"
    return None


BACKENDS.register("eager", Backend("eager", EAGER_CAPABILITIES, "attnkit.kernels.eager:eager_attention",
                                   returns_probs=True))
BACKENDS.register("torch", Backend("torch", TORCH_CAPABILITIES, "attnkit.kernels.torch_path:torch_attention",
                                   unsupported_combinations=FUSED_UNSUPPORTED))
#: Triton: group partials in one fused pass per group; plain attention stays on PyTorch's fused SDPA kernels. The
#: interpreter is for tests, never an automatic choice on CPU.
BACKENDS.register("triton", Backend("triton", TRITON_CAPABILITIES, "attnkit.kernels.torch_path:torch_attention",
                                    available=_triton_unavailable, unsupported_combinations=FUSED_UNSUPPORTED,
                                    kwargs=(("kernel", "triton"),), auto_on_cpu=False))
assert tuple(BACKENDS) == tuple(sorted(BACKEND_NAMES)), "every declared backend is registered, and only those"


def choose_backend(requested: str, needs: dict[str, list[str]], device) -> Backend:
    """Pick a backend. ``needs`` maps capability → names of the interventions that need it; every layer also needs
    ``mask`` (running the model's own attention mask exactly)."""
    device_type = getattr(device, "type", str(device))
    needs = {"mask": ["the model's attention mask"], **needs}
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
    for name in BACKEND_NAMES:
        backend = BACKENDS.get(name)
        if device_type != "cuda" and not backend.auto_on_cpu:
            continue
        if backend.supports(needs) and backend.available(device_type) is None:
            return backend
    raise ValueError(f"no backend supports {sorted(needs)} on {device_type}")
