"""Report: per-arm metrics, deltas vs baseline with paired bootstrap 95% CIs, markdown/JSON and figures.

Only examples finished by **every** arm enter the comparison (``n_paired``); the cost of an arm is its mean
wall-clock seconds per example.

Example:
    >>> from attnkit.eval.task import Task
    >>> class T(Task):
    ...     metrics = ("acc",)
    ...     def aggregate(self, recs): return {"acc": sum(r["c"] for r in recs) / len(recs)}
    >>> recs = [{"arm": a, "id": str(i), "c": c, "seconds": 0.1} for a, cs in (("baseline", [0, 1]), ("x", [1, 1]))
    ...         for i, c in enumerate(cs)]
    >>> r = build_report(T("t"), ["baseline", "x"], ["0", "1"], recs, n_boot=20)
    >>> r["arms"]["x"]["acc"], r["deltas"]["x"]["acc"]["delta"]
    (1.0, 0.5)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from attnkit.eval.stats import paired_bootstrap
from attnkit.eval.task import Task


def _by_arm(records, arms, ids):
    table = {(r["arm"], r["id"]): r for r in records}
    paired = [i for i in ids if all((a, i) in table for a in arms)]
    return {a: [table[(a, i)] for i in paired] for a in arms}, paired


def build_report(task: Task, arms: Sequence[str], ids: Sequence[str], records: Sequence[dict],
                 n_boot: int = 1000, seed: int = 0, baseline: str | None = None) -> dict:
    """The report dict (``task``, ``params``, ``n_paired``, ``arms`` metrics, ``deltas``, ``cost_s``)."""
    baseline = baseline or ("baseline" if "baseline" in arms else arms[0])
    per_arm, paired = _by_arm(records, arms, ids)
    metrics = {a: (task.aggregate(per_arm[a]) if paired else {}) for a in arms}
    deltas = {a: paired_bootstrap(task.aggregate, per_arm[baseline], per_arm[a], n_boot=n_boot, seed=seed)
              for a in arms if a != baseline and paired}
    cost = {a: (sum(r["seconds"] for r in per_arm[a]) / len(paired) if paired else math.nan) for a in arms}
    return {"task": task.name, "description": task.description, "params": task.params, "baseline": baseline,
            "n_examples": len(ids), "n_paired": len(paired), "metrics": list(task.metrics),
            "primary_metric": task.primary_metric,
            "higher_is_better": {m: task.is_better(m) for m in task.metrics},
            "arms": metrics, "deltas": deltas, "cost_s": cost,
            "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": 0.95, "paired": True}}


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)


def to_markdown(report: dict) -> str:
    """Markdown: a metric table per arm, then Δ vs baseline with the 95% CI (a ``note`` task param is shown above the table)."""
    arms, metrics, base = list(report["arms"]), report["metrics"], report["baseline"]
    lines = [f"# {report['task']}", "", report.get("description") or "", "",
             f"Paired examples: {report['n_paired']} of {report['n_examples']}. Baseline arm: `{base}`. "
             f"Parameters: `{json.dumps(report['params'], default=str)}`.", "",
             *([f"> **Note:** {report['params']['note']}", ""] if report["params"].get("note") else []),
             "| arm | " + " | ".join(metrics) + " | s/example |", "|---" * (len(metrics) + 2) + "|"]
    for a in arms:
        vals = [_fmt(report["arms"][a].get(m, math.nan)) for m in metrics]
        lines.append(f"| {a} | " + " | ".join(vals) + f" | {_fmt(report['cost_s'][a])} |")
    if report["deltas"]:
        lines += ["", f"Δ vs `{base}` (paired bootstrap 95% CI, {report['bootstrap']['n_boot']} resamples; "
                      f"arrow = direction that is better):", "",
                  "| arm | " + " | ".join(f"Δ {m} {'↑' if report['higher_is_better'][m] else '↓'}"
                                         for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for a, d in report["deltas"].items():
            cells = [f"{_fmt(d[m]['delta'])} [{_fmt(d[m]['ci_low'])}, {_fmt(d[m]['ci_high'])}]" if m in d else "–"
                     for m in metrics]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metric_figure(report: dict, metric: str | None = None):
    """Metric per arm (arms in run order, e.g. increasing strength) with the baseline + Δ 95% CI as error bars."""
    from matplotlib.figure import Figure

    metric = metric or report["primary_metric"]
    arms = list(report["arms"])
    vals = [report["arms"][a].get(metric, math.nan) for a in arms]
    base = report["arms"][report["baseline"]].get(metric, math.nan)
    lo = [0.0 if a not in report["deltas"] else vals[i] - (base + report["deltas"][a][metric]["ci_low"])
          for i, a in enumerate(arms)]
    hi = [0.0 if a not in report["deltas"] else (base + report["deltas"][a][metric]["ci_high"]) - vals[i]
          for i, a in enumerate(arms)]
    fig = Figure(figsize=(1.5 + 0.9 * len(arms), 3.2))
    ax = fig.add_subplot()
    ax.errorbar(range(len(arms)), vals, yerr=[[max(v, 0) for v in lo], [max(v, 0) for v in hi]],
                fmt="o-", capsize=4)
    ax.axhline(base, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{report['task']}: {metric} per arm (95% CI of Δ)")
    fig.tight_layout()
    return fig


def cost_figure(report: dict, metric: str | None = None):
    """Quality-vs-cost scatter: primary metric against mean seconds per example, one point per arm."""
    from matplotlib.figure import Figure

    metric = metric or report["primary_metric"]
    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.add_subplot()
    for a in report["arms"]:
        x, y = report["cost_s"][a], report["arms"][a].get(metric, math.nan)
        ax.scatter([x], [y])
        ax.annotate(a, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("seconds per example")
    ax.set_ylabel(metric)
    ax.set_title(f"{report['task']}: quality vs cost")
    fig.tight_layout()
    return fig


def write_report(report: dict, task: Task, records: Sequence[dict], out_dir: str | Path,
                 figures: bool = True) -> list[Path]:
    """Write report.json, report.md and (optionally) PNG figures; returns the written paths."""
    out_dir = Path(out_dir)
    written = [out_dir / "report.json", out_dir / "report.md"]
    written[0].write_text(json.dumps(report, indent=2, default=str))
    md = to_markdown(report)
    if figures and report["n_paired"]:
        figs = {"metric_vs_arm": metric_figure(report), "quality_vs_cost": cost_figure(report)}
        per_arm, _ = _by_arm(records, list(report["arms"]), list(dict.fromkeys(r["id"] for r in records)))
        figs.update(task.figures(per_arm))
        for name, fig in figs.items():
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
        md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in written[2:]) + "\n"
    written[1].write_text(md)
    return written
