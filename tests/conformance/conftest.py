"""The conformance cells' shared fixture; the table of cells is printed by ``matrix_table.py`` (loaded from
``tests/conftest.py``, so that the xdist controller, which loads only the top-level conftest, prints it)."""

import os
import sys

import pytest

import attnkit

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _remove_every_handle(monkeypatch):
    """Every handle a cell creates is removed after it, whatever happened, so one failing cell cannot leave the
    shared (cached) family models attached for the next one."""
    created = []
    attach = attnkit.attach

    def recording_attach(*args, **kwargs):
        handle = attach(*args, **kwargs)
        created.append(handle)
        return handle

    monkeypatch.setattr(attnkit, "attach", recording_attach)
    yield
    for handle in reversed(created):
        handle.remove()
