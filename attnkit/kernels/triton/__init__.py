"""Fused Triton kernels for grouped / biased attention and key-mass statistics (GPU; CPU via the interpreter).

Importing this package never imports triton: the kernels live in :mod:`attnkit.kernels.triton._flash`, loaded on
first use. On a machine without CUDA the kernels run only through the Triton interpreter, which must be switched
on with ``TRITON_INTERPRET=1`` *before* the kernel module is imported (triton reads it at ``@triton.jit`` time).

Public entry points mirror :mod:`attnkit.kernels.grouped` and :mod:`attnkit.kernels.stats`:
:func:`group_partials`, :func:`biased_attention`, :func:`key_mass`, plus :func:`triton_available`.

Example:
    >>> from attnkit.kernels.triton import triton_available
    >>> isinstance(triton_available(), bool)
    True
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["triton_available", "group_partials", "biased_attention", "key_mass", "MAX_GROUPS"]

MAX_GROUPS = 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when triton is importable and can run: CUDA is available or ``TRITON_INTERPRET=1`` is set."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available() or _interpreting()


def _kernels():
    if not triton_available():
        raise RuntimeError(
            "the 'triton' attention backend needs the triton package and a CUDA GPU (or TRITON_INTERPRET=1 set "
            "before attnkit's kernels are first used, for slow CPU testing); use backend='torch' instead")
    from attnkit.kernels.triton import _flash

    return _flash


def group_partials(q, k, v, key_group, num_groups, **kw):
    """Triton version of :func:`attnkit.kernels.grouped.group_partials` (same arguments and outputs)."""
    return _kernels().group_partials(q, k, v, key_group, num_groups, **kw)


def biased_attention(q, k, v, key_group, group_bias, **kw):
    """Triton version of :func:`attnkit.kernels.grouped.biased_attention` (same arguments and output)."""
    return _kernels().biased_attention(q, k, v, key_group, group_bias, **kw)


def key_mass(q, k, **kw):
    """Triton version of :func:`attnkit.kernels.stats.key_mass` (same arguments and output)."""
    return _kernels().key_mass(q, k, **kw)
