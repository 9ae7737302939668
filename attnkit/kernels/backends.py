"""The one list of attention backends: names, what each can run, and how ``auto`` chooses.

* ``eager`` — the reference: materialises scores and probabilities ``[B,H,Q,K]`` and applies every hook literally.
* ``torch`` — CPU/GPU, no ``[Q, K]`` matrix for structured edits (fused SDPA, span decomposition, query chunks).
* ``flex`` — compiled FlexAttention (:mod:`attnkit.kernels.flex`): score_mod / block_mask for pre-softmax edits
  and logit soft-capping; post-softmax group edits only where compiled flex returns the LSE (CUDA). Never chosen
  automatically on CPU (every new shape compiles; slower than ``torch`` there: see :data:`COSTS`).
* ``triton`` — GPU fused kernels for group partials, group biases and key statistics (CPU only through the
  interpreter, never chosen automatically there).

Every backend runs the model's own attention mask exactly (bidirectional image blocks, prefix, chunked and sliding
masks, padding): the fused ones take a fast path only when the mask provably has the standard causal + padding
(+ window) structure and otherwise slice the given mask per query chunk (:mod:`attnkit.kernels.masks`). The
``mask`` capability records that contract; a backend without it would never be picked for a layer.

``choose_backend("auto", needs, device)`` considers the backends that support every capability the layer's
interventions need on that device and are available there, and picks the cheapest by :data:`COSTS` — time over
stock SDPA per edit class, measured once per device type (CPU: ``benchmarks/attention.py --costs``; CUDA:
``benchmarks/gpu.py`` on an H200) — or, where a device type has no measurements, the first in
:data:`BACKEND_NAMES`. :func:`explain` says why, per backend. An explicit choice that cannot work raises naming the
intervention and the missing capability. The kernel functions' ``backend=`` arguments (``grouped.group_partials`` …)
take the same names (:func:`kernel_name`). This module imports no kernel at import time, so every kernel module may
import it.

Example:
    >>> choose_backend("auto", {"edit_output": ["gain"]}, "cpu").name
    'torch'
    >>> choose_backend("auto", {"edit_probs": ["var"]}, "cpu").name
    'eager'
    >>> choose_backend("auto", {"group_factors": ["act"]}, "cpu").name
    'torch'
    >>> sorted(BACKENDS.get("flex").capabilities_on("cpu") - BACKENDS.get("flex").capabilities_on("cuda"))
    []
    >>> kernel_name("torhc")
    Traceback (most recent call last):
    ...
    ValueError: unknown backend 'torhc'; did you mean 'torch'? Choose one of triton, flex, torch, eager
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import shutil
from dataclasses import dataclass
from typing import Callable

from attnkit.registry import Registry

#: every backend, in the order ``auto`` prefers them (fastest first); the only place backend names are declared
BACKEND_NAMES = ("triton", "flex", "torch", "eager")
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
#: flex everywhere; ``group_factors`` needs each group's LSE from compiled flex: CUDA only (see kernels/flex.py)
FLEX_CAPABILITIES = frozenset({"query_scale", "score_bias", "edit_output", "softcap", "mask",
                               "key_stats"}) | PRE_BACKEND_CAPABILITIES
FLEX_LSE_CAPABILITIES = frozenset({"group_factors"})
#: capability pairs the fused backends cannot combine in one layer (an arbitrary score bias breaks group partials
#: and the key statistics, which are computed from q and k)
FUSED_UNSUPPORTED = (frozenset({"score_bias", "group_factors"}), frozenset({"score_bias", "key_stats"}))
#: flex soft-caps inside score_mod; its group partials and key statistics are computed without the cap
FLEX_UNSUPPORTED = FUSED_UNSUPPORTED + (frozenset({"softcap", "group_factors"}), frozenset({"softcap", "key_stats"}))

#: which edit class (a row of ``benchmarks/attention.py``) each capability costs
EDIT_CLASS = {"query_scale": "none", "edit_output": "none", "mask": "none", "score_bias": "bias",
              "group_factors": "reweight", "key_stats": "key_mass", "softcap": "softcap", "edit_scores": "materialise",
              "edit_probs": "materialise", "probs": "materialise"}

#: edit classes that are a pass of their own (key statistics), added to the attention call's cost
ADDITIVE_CLASSES = frozenset({"key_mass"})
#: time / stock SDPA per device type, backend and edit class. CPU: B=1, H=8, D=64, fp32, N=2048, one thread, measured
#: with ``python benchmarks/attention.py --costs`` (it prints this table; see benchmarks/README.md for the run and its
#: load); CUDA: see its comment. A layer costs its most expensive attention class plus every additive pass it needs.
COSTS = {
    "cpu": {
        "torch": {"none": 1.02, "bias": 1.07, "reweight": 1.25, "key_mass": 1.05},
        "eager": {"none": 10.5, "bias": 11.9, "reweight": 10.6, "key_mass": 5.5, "softcap": 11.0, "materialise": 10.5},
        "flex": {"none": 1.7, "bias": 1.8, "softcap": 1.9, "key_mass": 1.05},
    },
    # NVIDIA H200, torch 2.11 + triton 3.6, fp16, B=1, H=32, D=128, N=8192, wall time (benchmarks/gpu.py, the table in
    # benchmarks/GPU.md). Not measured there, so taken from the nearest measured class: flex softcap = flex bias (the
    # same score_mod shape), eager softcap / materialise = eager none (eager materialises every map anyway); flex's
    # key statistics are the torch pass. The torch path is slow on a GPU (per-chunk host work): auto never prefers it.
    "cuda": {
        "triton": {"none": 3.27, "bias": 3.32, "reweight": 3.53, "key_mass": 4.32},
        "flex": {"none": 3.62, "bias": 3.87, "softcap": 3.87, "reweight": 11.81, "key_mass": 169.0},
        "torch": {"none": 347.0, "bias": 344.0, "reweight": 142.0, "key_mass": 169.0},
        "eager": {"none": 37.3, "bias": 45.4, "reweight": 56.6, "key_mass": 33.9, "softcap": 37.3,
                  "materialise": 37.3},
    },
}

BACKENDS = Registry("backend")


def kernel_name(name: str) -> str:
    """Validate a backend name given to a kernel function; raises ``ValueError`` with a suggestion."""
    if name in BACKEND_NAMES:
        return name
    close = difflib.get_close_matches(str(name), BACKEND_NAMES, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown backend {name!r}{hint} Choose one of {', '.join(BACKEND_NAMES)}")


@functools.lru_cache(maxsize=None)
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
    #: capabilities that exist only on some device types: device type -> extra capabilities
    device_capabilities: tuple = ()  # ((device_type, frozenset), ...)

    def capabilities_on(self, device_type: str) -> frozenset:
        extra = [caps for dev, caps in self.device_capabilities if dev == device_type]
        return self.capabilities.union(*extra)

    def supports(self, needs, device_type: str = "cpu") -> bool:
        caps = set(needs)
        return caps <= self.capabilities_on(device_type) and not any(
            combo <= caps for combo in self.unsupported_combinations)

    def missing(self, needs: dict, device_type: str) -> dict:
        """Capability → names of the interventions needing it, for what this backend cannot run here."""
        have = self.capabilities_on(device_type)
        missing = {cap: names for cap, names in needs.items() if cap not in have}
        for combo in self.unsupported_combinations:
            if combo <= set(needs):
                missing.update({cap: needs[cap] for cap in combo})
        return missing

    def cost(self, needs, device_type: str) -> float | None:
        """Estimated time / stock SDPA for a layer needing ``needs`` (None: not measured on this device type)."""
        table = COSTS.get(device_type, {}).get(self.name)
        if table is None:
            return None
        classes = {EDIT_CLASS.get(cap, "none") for cap in needs}
        try:
            attention = max(table[c] for c in classes - ADDITIVE_CLASSES | {"none"})
            return round(attention + sum(table[c] for c in classes & ADDITIVE_CLASSES), 2)
        except KeyError:
            return None

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


#: the oldest torch whose compiled FlexAttention ran on CPU here (2.13 passes the flex tests; 2.7's inductor fails
#: to compile it: "CppCompileError" / "FlexAttentionHigherOrderVariable() has no type"; releases between are untested)
CPU_FLEX_MIN_TORCH = (2, 13)


def _torch_release(version: str) -> tuple[int, int]:
    """``"2.13.0+cpu"`` → ``(2, 13)``."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def flex_unavailable(device_type: str) -> str | None:
    """None when compiled FlexAttention can run on ``device_type``, else the reason (no kernel import).

    Example:
        >>> flex_unavailable("mps") is not None
        True
    """
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return "this torch has no torch.nn.attention.flex_attention (torch >= 2.5 needed)"
    if device_type == "cuda":
        import torch

        return None if torch.cuda.is_available() else "no CUDA device"
    if device_type == "cpu":
        import torch

        if _torch_release(torch.__version__) < CPU_FLEX_MIN_TORCH:
            return (f"compiled FlexAttention on CPU is tested from torch {'.'.join(map(str, CPU_FLEX_MIN_TORCH))} "
                    f"(torch 2.7 fails to compile it); this is torch {torch.__version__}")
        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            return "compiling FlexAttention on CPU needs a C++ compiler (g++ / clang++) on PATH"
        return None
    return f"FlexAttention is not compiled for {device_type} here"


BACKENDS.register("eager", Backend("eager", EAGER_CAPABILITIES, "attnkit.kernels.eager:eager_attention",
                                   returns_probs=True))
BACKENDS.register("torch", Backend("torch", TORCH_CAPABILITIES, "attnkit.kernels.torch_path:torch_attention",
                                   unsupported_combinations=FUSED_UNSUPPORTED))
#: FlexAttention, compiled: a CPU choice only on request (first call of every shape compiles for seconds)
BACKENDS.register("flex", Backend("flex", FLEX_CAPABILITIES, "attnkit.kernels.flex:flex_attention",
                                  available=flex_unavailable, unsupported_combinations=FLEX_UNSUPPORTED,
                                  auto_on_cpu=False, device_capabilities=(("cuda", FLEX_LSE_CAPABILITIES),)))
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
        missing = backend.missing(needs, device_type)
        if missing:
            detail = "; ".join(f"{', '.join(sorted(set(n)))} needs '{cap}'" for cap, n in missing.items())
            raise ValueError(f"backend {requested!r} cannot run this recipe: {detail}. Use backend='auto' or 'eager'.")
        reason = backend.available(device_type)
        if reason:
            raise ValueError(f"backend {requested!r} is unavailable on {device_type}: {reason}")
        return backend
    verdicts = explain(needs, device_type)
    chosen = next((v for v in verdicts if v["chosen"]), None)
    if chosen is None:
        raise ValueError(f"no backend supports {sorted(needs)} on {device_type}")
    return BACKENDS.get(chosen["backend"])


def explain(needs: dict[str, list[str]], device) -> list[dict]:
    """How ``auto`` decides for a layer needing ``needs`` on ``device``: one dict per backend, in
    :data:`BACKEND_NAMES` order, with ``backend``, ``eligible``, ``cost`` (estimated time / SDPA or None),
    ``reason`` (one phrase) and ``chosen`` (exactly one is True when any backend can run the layer).

    Example:
        >>> [(v["backend"], v["chosen"], v["reason"]) for v in explain({"group_factors": ["var"]}, "cpu")][2:]
        [('torch', True, 'cheapest measured (~1.25× SDPA)'), ('eager', False, 'measured ~10.6× SDPA')]
        >>> flex = explain({"softcap": ["gemma2"]}, "cpu")[1]   # never automatic on CPU (or unavailable there)
        >>> flex["backend"], flex["chosen"], flex["reason"].startswith(("never automatic on CPU", "unavailable"))
        ('flex', False, True)
    """
    device_type = getattr(device, "type", str(device))
    needs = {"mask": ["the model's attention mask"], **needs}
    verdicts = []
    for name in BACKEND_NAMES:
        backend = BACKENDS.get(name)
        missing = backend.missing(needs, device_type)
        unavailable = None if missing else backend.available(device_type)
        cost = backend.cost(needs, device_type)
        if missing:
            reason = "cannot run " + ", ".join(f"'{cap}'" for cap in sorted(missing))
        elif unavailable:
            reason = f"unavailable: {unavailable}"
        elif device_type != "cuda" and not backend.auto_on_cpu:
            reason = "never automatic on CPU" + (" (interpreter only)" if name == "triton" else
                                                  f" (compiles per shape; measured ~{cost}× SDPA)" if cost else "")
        else:
            reason = None
        verdicts.append(dict(backend=name, eligible=reason is None, cost=cost, reason=reason, chosen=False))
    eligible = [v for v in verdicts if v["eligible"]]
    if eligible:
        measured = all(v["cost"] is not None for v in eligible)
        best = min(eligible, key=lambda v: v["cost"]) if measured else eligible[0]
        best["chosen"] = True
        for v in eligible:
            if v is best and len(eligible) == 1:
                v["reason"] = "the only one that can run it here" + (f" (measured ~{v['cost']}× SDPA)" if v["cost"]
                                                                      else "")
            elif v is best:
                v["reason"] = (f"cheapest measured (~{v['cost']}× SDPA)" if measured else
                               f"first capable in the static order {', '.join(BACKEND_NAMES)} (no cost table for "
                               f"{device_type})")
            else:
                v["reason"] = f"measured ~{v['cost']}× SDPA" if measured else "later in the static order"
    return verdicts
