"""One configurable path to the shared data sets (POPE, CHAIR, COCO, wikitext-2, TruthfulQA, NIAH).

Set ``ATTNKIT_DATA`` to point elsewhere; by default the ``shared/data`` folder next to the repository is used.

Example:
    >>> from attnkit.data import data_path
    >>> data_path("wikitext-2", "test.txt").name
    'test.txt'
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ATTNKIT_DATA"


def data_dir() -> Path:
    """Root of the data folder: ``$ATTNKIT_DATA`` or ``<repo>/../shared/data``."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "data"


def data_path(*parts: str, must_exist: bool = False) -> Path:
    """Path inside the data folder; with ``must_exist`` raise a clear error naming the variable to set."""
    path = data_dir().joinpath(*parts)
    if must_exist and not path.exists():
        raise FileNotFoundError(
            f"attnkit data file {path} not found. Set {ENV_VAR}=/path/to/data (the folder holding "
            f"pope/, chair/, coco_tiny/, wikitext-2/, truthfulqa/, niah/)."
        )
    return path
