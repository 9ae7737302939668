"""What ``handle.report()`` returns: a dict (``report["calls"]["act"]`` keeps working) that prints as a table.

Consecutive layers with the same component, backend and interventions share one row.

Example:
    >>> r = Report({"recipe": "demo", "adapter": "transformers", "enabled": True, "removed": False,
    ...             "modules": [{"module": f"model.layers.{i}.self_attn", "layer": i, "component": "text",
    ...                          "backend": "torch", "interventions": ["act"]} for i in (2, 3, 4)],
    ...             "calls": {"act": 6}})
    >>> print(r)
    attnkit report: recipe 'demo' on a transformers model (active)
      intervention  calls
      act               6
      component  layers  backend  interventions  modules
      text       2-4     torch    act            model.layers.N.self_attn
    >>> r["calls"]["act"]
    6
"""

from __future__ import annotations

import re


def _layer_text(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def _module_text(names: list[str], layers: list[int]) -> str:
    """One name pattern for the group (layer index → N) or ``first … last``."""
    patterns = {re.sub(rf"(^|\.){layer}(\.|$)", r"\1N\2", name, count=1) for name, layer in zip(names, layers)}
    if len(patterns) == 1:
        return patterns.pop()
    return names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"


def _groups(modules: list[dict]) -> list[dict]:
    """Runs of consecutive layers sharing component, backend and interventions."""
    groups: list[dict] = []
    for m in modules:
        key = (m.get("component"), m.get("backend"), tuple(m.get("interventions", ())))
        last = groups[-1] if groups else None
        if last is not None and last["key"] == key and m.get("layer") == last["layers"][-1] + 1:
            last["layers"].append(m["layer"])
            last["names"].append(m["module"])
        else:
            groups.append({"key": key, "layers": [m.get("layer")], "names": [m.get("module")]})
    return groups


def _table(rows: list[tuple], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


class Report(dict):
    """A handle's report: a plain dict with keys ``recipe``, ``adapter``, ``enabled``, ``removed``, ``modules``
    (one dict per patched attention module) and ``calls`` (per intervention); ``str()`` is a readable table."""

    def state(self) -> str:
        if self.get("removed"):
            return "removed"
        return "active" if self.get("enabled", True) else "disabled"

    def __str__(self) -> str:
        lines = [f"attnkit report: recipe {self.get('recipe')!r} on a {self.get('adapter')} model ({self.state()})"]
        calls = self.get("calls") or {}
        if calls:
            lines += _table([("intervention", "calls")] + [(k, f"{v:,}") for k, v in calls.items()], right={1})
        modules = self.get("modules") or []
        if modules:
            rows = [("component", "layers", "backend", "interventions", "modules")]
            for g in _groups(modules):
                component, backend, ivs = g["key"]
                rows.append((component, _layer_text(g["layers"]), backend, ", ".join(ivs) or "(capture only)",
                             _module_text(g["names"], g["layers"])))
            lines += _table(rows)
        else:
            lines.append("  no attention module patched")
        return "\n".join(lines)
