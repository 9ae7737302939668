"""``HeadScores``: one number per (layer, head) plus what produced it, saved as safetensors + JSON (never pickle).

A HeadScores can be used directly as an intervention target (it has ``layer_heads()``), usually after a selection
with :meth:`HeadScores.top_k` or :meth:`HeadScores.threshold`.

Example:
    >>> import torch, tempfile, os
    >>> hs = HeadScores(torch.tensor([[0.1, 0.9], [0.5, 0.3]]), method="demo", model="tiny")
    >>> hs.top_k(2).layer_heads()
    {0: [1], 1: [0]}
    >>> hs.threshold(0.2).layer_heads()
    {0: [1], 1: [0, 1]}
    >>> path = os.path.join(tempfile.mkdtemp(), "demo")
    >>> HeadScores.load(hs.save(path)).scores.tolist() == hs.scores.tolist()
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

_META_KEY = "attnkit_headscores"
FORMAT_VERSION = 1


@dataclass
class HeadScores:
    """Scores ``[layers, heads]`` (fp32, CPU) with provenance; ``selected`` (bool, same shape) once selected."""

    scores: torch.Tensor  # [L, H]
    method: str = ""
    model: str = ""
    data: str = ""
    params: dict = field(default_factory=dict)
    selected: torch.Tensor | None = None  # [L, H] bool

    def __post_init__(self):
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        if self.scores.dim() != 2:
            raise ValueError(f"HeadScores needs a [layers, heads] tensor, got shape {tuple(self.scores.shape)}")
        if self.selected is not None and self.selected.shape != self.scores.shape:
            raise ValueError("HeadScores.selected must have the shape of scores")

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def num_heads(self) -> int:
        return self.scores.shape[1]

    # ---- selection ---------------------------------------------------------------------------------------
    def _with(self, selected: torch.Tensor, how: dict) -> "HeadScores":
        params = dict(self.params, selection=how)
        return HeadScores(self.scores.clone(), self.method, self.model, self.data, params, selected)

    def top_k(self, k: int, per_layer: bool = False, largest: bool = True) -> "HeadScores":
        """Select the ``k`` best heads overall (or per layer). NaN scores are never selected."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"top_k needs a positive int, got {k!r}")
        s = self.scores.nan_to_num(float("-inf") if largest else float("inf"))
        s = s if largest else -s
        selected = torch.zeros_like(self.scores, dtype=torch.bool)  # [L, H]
        if per_layer:
            idx = s.topk(min(k, self.num_heads), dim=1).indices  # [L, k]
            selected.scatter_(1, idx, True)
        else:
            flat = s.flatten().topk(min(k, s.numel())).indices
            selected.view(-1)[flat] = True
        return self._with(selected & torch.isfinite(s), {"top_k": k, "per_layer": per_layer, "largest": largest})

    def threshold(self, value: float, above: bool = True) -> "HeadScores":
        """Select heads with score ``> value`` (or ``< value`` with ``above=False``)."""
        selected = self.scores > value if above else self.scores < value
        return self._with(selected, {"threshold": value, "above": above})

    def layer_heads(self) -> dict[int, list[int]]:
        """``{layer: [heads]}`` of the selected heads (all heads when nothing was selected)."""
        mask = self.selected if self.selected is not None else torch.ones_like(self.scores, dtype=torch.bool)
        out: dict[int, list[int]] = {}
        for layer, head in torch.nonzero(mask).tolist():
            out.setdefault(layer, []).append(head)
        return out

    # ---- I/O ---------------------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"format": FORMAT_VERSION, "method": self.method, "model": self.model, "data": self.data,
                "params": self.params, "shape": list(self.scores.shape)}

    def save(self, path) -> Path:
        """Write ``<path>.safetensors`` (tensors + metadata) and ``<path>.json`` (readable metadata).
        Returns the safetensors path."""
        from safetensors.torch import save_file

        base = Path(path)
        if base.suffix in (".safetensors", ".json"):
            base = base.with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        tensors = {"scores": self.scores.contiguous()}
        if self.selected is not None:
            tensors["selected"] = self.selected.to(torch.uint8).contiguous()
        st_path = base.with_suffix(".safetensors")
        save_file(tensors, str(st_path), metadata={_META_KEY: json.dumps(meta)})
        base.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return st_path

    @classmethod
    def load(cls, path) -> "HeadScores":
        """Read a file written by :meth:`save` (either the .safetensors or the .json path, or the stem)."""
        from safetensors import safe_open

        base = Path(path)
        st_path = base if base.suffix == ".safetensors" else base.with_suffix(".safetensors")
        if not st_path.exists():
            raise FileNotFoundError(f"head scores file {st_path} does not exist")
        with safe_open(str(st_path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
            scores = f.get_tensor("scores")
            selected = f.get_tensor("selected").bool() if "selected" in f.keys() else None
        return cls(scores, meta.get("method", ""), meta.get("model", ""), meta.get("data", ""),
                   meta.get("params", {}), selected)

    def __repr__(self) -> str:
        n_sel = "all" if self.selected is None else int(self.selected.sum())
        return (f"HeadScores(method={self.method!r}, model={self.model!r}, shape={tuple(self.scores.shape)}, "
                f"selected={n_sel})")
