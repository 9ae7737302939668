"""Every transformers name attnkit relies on that is private or has changed between releases, in one module.

attnkit reaches transformers through public surfaces (``AttentionInterface``, ``AttentionMaskInterface``, forward
hooks, ``generate`` inputs). The few places where that is not enough live here, each with the reason, so that a new
transformers release breaks at most this file (``tests/hooks/test_compat.py`` covers every function):

* the cache keyword: transformers 5.24 renamed ``past_key_values`` to ``cache`` on every forward (the old name is
  accepted with a FutureWarning until 5.40) and ``generate()`` passes ``cache=``; forward pre-hooks see the kwargs
  before that rename, so any spelling may arrive. Older releases silently drop ``cache=`` into ``**kwargs``.
* ``config._attn_implementation_internal``: switching one sub-config (not the whole model) to attnkit's function;
  the public ``set_attn_implementation`` switches every sub-config of a model at once and validates names.
* ``_supports_attention_backend``: the only flag that says whether a model class dispatches through the interface.
* ``eager_attention_forward`` of a modeling module: the model's own reference attention (some families scale or
  softcap inside it), used to fall through exactly when a model was loaded with ``attn_implementation="eager"``.

Example:
    >>> import torch
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    >>> cache = output_cache(out)
    >>> cache.get_seq_length()
    3
    >>> past_length({"attention_mask": torch.ones(1, 4), **cache_kwargs(model, cache)}, new_len=1)
    3
    >>> step = model(torch.tensor([[4]]), **cache_kwargs(model, cache))
    >>> cache.get_seq_length()
    4
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch

#: every spelling of the cache keyword transformers has used (newest first)
CACHE_KWARGS = ("cache", "past_key_values", "cache_params")


class CacheMismatchError(ValueError):
    """The 2-D attention mask and the KV cache disagree about how many tokens came before a call."""


# ---- the cache keyword ------------------------------------------------------------------------------------------
def cache_from_kwargs(kwargs: dict) -> Any:
    """The cache passed to a forward call under any spelling (None when there is none)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache under on the installed transformers (``cache`` from 5.24,
    ``past_key_values`` before). Read from the signature, so a model class that kept the old name also works."""
    params = inspect.signature(model.forward).parameters
    for name in CACHE_KWARGS:
        if name in params:
            return name
    return "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any, use_cache: bool = True) -> dict:
    """``{<name>: cache, "use_cache": use_cache}`` for calling ``model`` with a cache on the installed version."""
    return {cache_kwarg(model): cache, "use_cache": use_cache}


def output_cache(output: Any) -> Any:
    """The cache a model output carries (``output.cache`` from 5.24, ``output.past_key_values`` before), without
    touching the deprecated alias (which logs a warning)."""
    for name in CACHE_KWARGS:
        try:
            value = output[name] if isinstance(output, dict) else getattr(output, name, None)
        except (KeyError, AttributeError):
            value = None
        if value is not None:
            return value
    return None


def cache_length(cache: Any) -> int | None:
    """Tokens a cache has seen (``get_seq_length()``), 0 for None, None when the object cannot say."""
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except Exception:  # noqa: BLE001 - exotic caches (tuples, mamba states) cannot say
        return None


def past_length(kwargs: dict, new_len: int, tracked: int | None = None) -> int:
    """How many tokens of the sequence came before a forward call with ``new_len`` new tokens.

    The 2-D ``attention_mask`` (``generate`` passes it full-length on every step, on every release) is the source;
    the cache (any spelling) is the fallback when no 2-D mask is given. A cache may hold fewer slots than tokens
    seen (pruned, windowed or evicting caches), never more, and is empty exactly when nothing came before: anything
    else raises :class:`CacheMismatchError` instead of silently treating a decode step as a new sequence.
    ``tracked`` (attnkit's own count) is used for caches that hold fewer slots than tokens seen when no mask says.

    Example:
        >>> past_length({"attention_mask": torch.ones(2, 5)}, new_len=5)
        0
        >>> past_length({}, new_len=5)
        0
    """
    cache = cache_from_kwargs(kwargs)
    cached = cache_length(cache)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        from_mask = mask.shape[1] - new_len
        if from_mask < 0:
            raise CacheMismatchError(
                f"the attention_mask covers {mask.shape[1]} tokens but this call has {new_len} new tokens; pass a "
                "mask over the cached tokens plus the new ones")
        if cached is not None and ((from_mask == 0) != (cached == 0) or cached > from_mask):
            raise CacheMismatchError(
                f"the attention_mask says {from_mask} tokens came before this call but the KV cache holds {cached}; "
                "pass a mask over the cached tokens plus the new ones (as generate() does), or a fresh cache")
        return from_mask
    if not cached:
        return 0
    return tracked if tracked is not None and tracked >= cached else cached


# ---- attention implementation of a config ----------------------------------------------------------------------
def attn_implementation(config) -> str | None:
    """The attention implementation a config dispatches to."""
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation(config, name: str | None) -> None:
    """Switch one config (not the whole model) to ``name``; the private field because the public
    ``set_attn_implementation`` switches every sub-config of a model at once."""
    config._attn_implementation_internal = name


def supports_attention_interface(model) -> bool:
    """Whether the model class dispatches attention through ``AttentionInterface``."""
    return bool(getattr(model, "_supports_attention_backend", False))


def model_eager_function(module: torch.nn.Module):
    """The modeling module's own ``eager_attention_forward`` for an attention module (None if it has none)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def model_from_config(model_class, config, attn_implementation: str | None = None):
    """A randomly initialised ``model_class`` for ``config`` (tiny test models). ``_from_config`` because the
    public ``from_config`` exists only on the Auto classes, which would pick the class themselves."""
    return model_class._from_config(config, attn_implementation=attn_implementation)
