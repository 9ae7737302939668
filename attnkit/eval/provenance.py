"""What produced a result: the model (name or path, revision, dtype, device), each arm (its recipe YAML and a
hash), package versions, the git commit of the attnkit checkout and the date. The runner writes this into
``run.json`` and the report; resuming into a folder whose model, dtype, arms or task differ is refused
(``mismatch`` gives the sentence).

Example:
    >>> v = versions()
    >>> sorted(k for k in ("attnkit", "torch", "transformers") if v.get(k))
    ['attnkit', 'torch', 'transformers']
    >>> mismatch({"task": "pope_random", "model": {"dtype": "torch.float32"}},
    ...          {"task": "pope_random", "model": {"dtype": "torch.bfloat16"}})
    "model dtype 'torch.float32' (this run: 'torch.bfloat16')"
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = ("attnkit", "torch", "transformers", "diffusers", "accelerate", "datasets", "rouge_score", "lm_eval")


def versions() -> dict:
    """Installed versions of attnkit and the packages results depend on (``None``: not installed), plus Python."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if out["attnkit"] is None:
        import attnkit

        out["attnkit"] = getattr(attnkit, "__version__", None)
    if out["torch"] is not None:  # the build matters too (CPU, CUDA 12.6, …): torch reports it, its metadata not
        import torch

        out["torch"] = torch.__version__
    out["python"] = platform.python_version()
    return out


def git_commit() -> dict | None:
    """``{"commit", "dirty"}`` of the git checkout attnkit is imported from, or ``None`` (installed package)."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "attnkit"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status), "path": str(repo)}


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def model_info(model, name: str | None = None) -> dict:
    """Name or path, revision, class, dtype, device and parameter count of a model (or pipeline)."""
    config = getattr(model, "config", None)
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    return {
        "name_or_path": name or getattr(config, "_name_or_path", None) or None,
        "revision": getattr(config, "_commit_hash", None),
        "class": type(model).__name__,
        "dtype": str(params[0].dtype) if params else None,
        "device": str(params[0].device) if params else None,
        "n_parameters": sum(p.numel() for p in params) if params else None,
    }


def recipe_info(recipe) -> dict:
    """A recipe's name, source, YAML (normalised: ``Recipe.to_yaml``) and the sha256 of that YAML."""
    text = recipe.to_yaml()
    return {"kind": "recipe", "name": recipe.name, "source": recipe.source, "yaml": text,
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _fingerprint(config: dict) -> list[tuple[str, object]]:
    """The fields that must agree to resume: task, its parameters, the model, its dtype, each arm's recipe."""
    model = config.get("model") or {}
    out = [("task", config.get("task")), ("task parameters", config.get("params")),
           ("model", model.get("name_or_path")), ("model revision", model.get("revision")),
           ("model dtype", model.get("dtype"))]
    for arm, info in (config.get("arms") or {}).items():
        if isinstance(info, dict):
            out.append((f"arm {arm!r} recipe (sha256)", info.get("sha256")))
    return out


def mismatch(old: dict, new: dict) -> str | None:
    """The first field on which two run configurations disagree, as ``"what 'old' (this run: 'new')"``; fields
    one side does not record (older folders, arms only one run has) are not compared."""
    theirs = dict(_fingerprint(old))
    for what, value in _fingerprint(new):
        if what in theirs and theirs[what] is not None and value is not None and theirs[what] != value:
            return f"{what} {theirs[what]!r} (this run: {value!r})"
    return None
