"""diffusers support (filled in below the transformers path)."""

from __future__ import annotations


def is_diffusers_object(obj) -> bool:
    return False


class DiffusersAdapter:  # pragma: no cover - replaced by the real adapter
    def __init__(self, obj):
        raise NotImplementedError
