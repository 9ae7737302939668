"""Interventions, one file per method under family folders (scoring/, sinks/, pruning/, steering/, calibration/).

Every method registers itself with :func:`register_intervention`; :func:`load_builtin` imports them all so that
names resolve, then loads third-party interventions (:func:`load_plugins`). Nothing central switches on method names.

Third-party packages make their interventions usable by name (in recipes, ``attnkit apply`` and the lm-eval plug-in)
by declaring an entry point in the group ``attnkit.interventions``; the object it names is an
:class:`Intervention` subclass (registered under its ``name``) or a module whose import registers its classes::

    # pyproject.toml of the third-party package
    [project.entry-points."attnkit.interventions"]
    my-method = "my_package.method:MyMethod"

Example:
    >>> load_builtin()
    >>> "noop" in INTERVENTIONS
    True
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import types
import warnings

from attnkit.interventions.base import (  # noqa: F401
    INTERVENTIONS,
    AttentionContext,
    Intervention,
    key_group_ids,
    register_intervention,
)

ENTRY_POINT_GROUP = "attnkit.interventions"

_LOADED = False
_PLUGINS_SEEN: set[tuple[str, str]] = set()  # (entry point name, value) already loaded or reported


def load_builtin() -> None:
    """Import every module below ``attnkit.interventions`` so their registrations run, then the plug-ins
    (idempotent)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.walk_packages(__path__, prefix=__name__ + "."):
        importlib.import_module(info.name)
    load_plugins()


def _register_plugin(ep) -> str | None:
    """Load one entry point; returns the registered name (None for a module that registers by itself)."""
    obj = ep.load()
    if isinstance(obj, type) and issubclass(obj, Intervention):
        register_intervention(obj)  # idempotent for the same class; a taken name raises
        return obj.name
    if isinstance(obj, types.ModuleType):
        return None
    raise TypeError(f"it names {obj!r}, not an attnkit.Intervention subclass or a module")


def load_plugins() -> list[str]:
    """Register the interventions that installed packages declare in the ``attnkit.interventions`` entry-point
    group; returns the names registered by this call. A plug-in that fails to load is reported with a warning
    naming its package and skipped. Each call looks again for packages installed since the last one.

    Example:
        >>> load_plugins()  # nothing new after the first call
        []
    """
    load_builtin()  # built-in names first: a plug-in may not take them
    names = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = (ep.name, ep.value)
        if key in _PLUGINS_SEEN:
            continue
        _PLUGINS_SEEN.add(key)
        dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
        try:
            name = _register_plugin(ep)
        except Exception as err:  # noqa: BLE001 - a broken plug-in must not break attnkit
            warnings.warn(f"attnkit: skipped intervention plug-in {ep.name!r} = {ep.value!r} from {dist}: "
                          f"{type(err).__name__}: {err}", stacklevel=2)
            continue
        if name is not None:
            names.append(name)
    return names
