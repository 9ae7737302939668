"""Interventions, one file per method under family folders (scoring/, sinks/, pruning/, steering/, calibration/).

Every method registers itself with :func:`register_intervention`; :func:`load_builtin` imports them all so that
names resolve. Nothing central switches on method names.
"""

from __future__ import annotations

import importlib
import pkgutil

from attnkit.interventions.base import (  # noqa: F401
    INTERVENTIONS,
    AttentionContext,
    Intervention,
    key_group_ids,
    register_intervention,
)

_LOADED = False


def load_builtin() -> None:
    """Import every module below ``attnkit.interventions`` so their registrations run (idempotent)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.walk_packages(__path__, prefix=__name__ + "."):
        importlib.import_module(info.name)
