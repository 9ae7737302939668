"""One configurable path to the shared data sets (POPE, CHAIR, COCO, wikitext-2, TruthfulQA, NIAH).

The data root is, in this order: ``$ATTNKIT_DATA``; in a source checkout, the ``shared/data`` folder next to the
repository; otherwise the per-user data directory (``$XDG_DATA_HOME/attnkit`` or ``~/.local/share/attnkit``;
``~/Library/Application Support/attnkit`` on macOS, ``%LOCALAPPDATA%\\attnkit`` on Windows). Nothing depends on
where the package is installed. :func:`data_root` also says which rule chose the root, for error messages.

Example:
    >>> from attnkit.data import data_path
    >>> data_path("wikitext-2", "test.txt").name
    'test.txt'
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_VAR = "ATTNKIT_DATA"
CONTENTS = "pope/, chair/, coco_tiny/, wikitext-2/, truthfulqa/, niah/"


def user_data_dir() -> Path:
    """The per-user data directory attnkit uses when neither ``$ATTNKIT_DATA`` nor a checkout says otherwise."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "attnkit"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "attnkit"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "attnkit"


def _checkout_data() -> Path | None:
    """``<repo>/../shared/data`` when this package runs from a source checkout that has it."""
    repo = Path(__file__).resolve().parent.parent
    candidate = repo.parent / "shared" / "data"
    if (repo / "pyproject.toml").is_file() and candidate.is_dir():
        return candidate
    return None


def data_root() -> tuple[Path, str]:
    """``(root, why)``: the data root and the rule that chose it (for messages)."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured).expanduser(), f"from ${ENV_VAR}"
    checkout = _checkout_data()
    if checkout is not None:
        return checkout, "the source checkout's shared/data"
    return user_data_dir(), f"the per-user data directory (${ENV_VAR} is not set)"


def data_dir() -> Path:
    """Root of the data folder (see the module docstring for how it is chosen)."""
    return data_root()[0]


def data_path(*parts: str, must_exist: bool = False) -> Path:
    """Path inside the data folder; with ``must_exist`` raise a clear error naming the root and how to change it."""
    root, why = data_root()
    path = root.joinpath(*parts)
    if must_exist and not path.exists():
        raise FileNotFoundError(
            f"attnkit data file {path} not found: the data root is {root} ({why}). Set {ENV_VAR}=/path/to/data, "
            f"the folder holding {CONTENTS}"
        )
    return path
