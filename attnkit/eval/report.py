"""Report: per-arm metrics with bootstrap 95% CIs, deltas vs baseline with paired bootstrap 95% CIs, provenance
(model, arms' recipes, versions, git, date), markdown/JSON and figures.

Only examples finished by **every** arm enter the comparison (``n_paired``); the cost of an arm is its mean
wall-clock seconds per example. What counts as better is stated per metric: ``higher``, ``lower`` or
``closer to X`` (POPE's yes-ratio: closer to 0.5).

Example:
    >>> from attnkit.eval.task import Task
    >>> class T(Task):
    ...     metrics = ("acc",)
    ...     def aggregate(self, recs): return {"acc": sum(r["c"] for r in recs) / len(recs)}
    >>> recs = [{"arm": a, "id": str(i), "c": c, "seconds": 0.1} for a, cs in (("baseline", [0, 1]), ("x", [1, 1]))
    ...         for i, c in enumerate(cs)]
    >>> r = build_report(T("t"), ["baseline", "x"], ["0", "1"], recs, n_boot=20)
    >>> r["arms"]["x"]["acc"], r["deltas"]["x"]["acc"]["delta"], r["better"]["acc"]
    (1.0, 0.5, 'higher')
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Sequence

from attnkit.eval.stats import bootstrap_ci, paired_bootstrap
from attnkit.eval.task import Task


def _by_arm(records, arms, ids):
    table = {(r["arm"], r["id"]): r for r in records}
    paired = [i for i in ids if all((a, i) in table for a in arms)]
    return {a: [table[(a, i)] for i in paired] for a in arms}, paired


def build_report(task: Task, arms: Sequence[str], ids: Sequence[str], records: Sequence[dict],
                 n_boot: int = 1000, seed: int = 0, baseline: str | None = None,
                 provenance: dict | None = None) -> dict:
    """The report dict (``task``, ``params``, ``n_paired``, ``arms`` metrics, ``ci`` per arm, ``deltas``,
    ``cost_s``, ``better`` per metric, ``provenance``)."""
    baseline = baseline or ("baseline" if "baseline" in arms else arms[0])
    per_arm, paired = _by_arm(records, arms, ids)
    metrics = {a: (task.aggregate(per_arm[a]) if paired else {}) for a in arms}
    cis = {a: (bootstrap_ci(task.aggregate, per_arm[a], n_boot=n_boot, seed=seed) if paired else {}) for a in arms}
    deltas = {a: paired_bootstrap(task.aggregate, per_arm[baseline], per_arm[a], n_boot=n_boot, seed=seed)
              for a in arms if a != baseline and paired}
    cost = {a: (sum(r["seconds"] for r in per_arm[a]) / len(paired) if paired else math.nan) for a in arms}
    prov = dict(provenance or {})
    prov.pop("params", None)
    prov.pop("task", None)
    return {"task": task.name, "description": task.describe(), "params": task.params, "baseline": baseline,
            "n_examples": len(ids), "n_paired": len(paired), "metrics": list(task.metrics),
            "primary_metric": task.primary_metric,
            "higher_is_better": {m: task.is_better(m) for m in task.metrics},
            "better": {m: task.better(m) for m in task.metrics},
            "arms": metrics, "ci": cis, "deltas": deltas, "cost_s": cost,
            "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": 0.95, "paired": True},
            "provenance": prov}


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)


def _arrow(better: str) -> str:
    return {"higher": "↑", "lower": "↓"}.get(better, f"→{better.split()[-1]}")


def _provenance_lines(report: dict) -> list[str]:
    """The markdown provenance section: model, arms (recipe + sha256), versions, git commit, dates."""
    prov = report.get("provenance") or {}
    if not prov:
        return []
    model = prov.get("model") or {}
    lines = ["", "## Provenance", "",
             f"- model: `{model.get('name_or_path')}` ({model.get('class')}), revision `{model.get('revision')}`, "
             f"dtype `{model.get('dtype')}`, device `{model.get('device')}`"]
    for arm, info in (prov.get("arms") or {}).items():
        if info.get("kind") == "recipe":
            lines.append(f"- arm `{arm}`: recipe `{info.get('name')}` from `{info.get('source')}`, "
                         f"sha256 `{str(info.get('sha256'))[:16]}…` (YAML in report.json)")
        else:
            lines.append(f"- arm `{arm}`: {info.get('kind', 'callable')} {info.get('name') or ''}".rstrip())
    vers = prov.get("versions") or {}
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v))
    git = prov.get("git")
    lines.append(f"- git: `{git['commit'][:12]}`{' (uncommitted changes)' if git.get('dirty') else ''}"
                 if git else "- git: not run from a checkout")
    sessions = prov.get("sessions") or []
    lines.append(f"- created {prov.get('created')}" + (f"; last run {sessions[-1].get('date')}" if sessions else ""))
    return lines


def to_markdown(report: dict) -> str:
    """Markdown: a metric table per arm (with 95% CIs), then Δ vs baseline with the paired 95% CI, then
    provenance (a ``note`` task param is shown above the table)."""
    arms, metrics, base = list(report["arms"]), report["metrics"], report["baseline"]
    better = report.get("better") or {m: "higher" if report["higher_is_better"][m] else "lower" for m in metrics}
    cis = report.get("ci") or {}
    lines = [f"# {report['task']}", "", report.get("description") or "", "",
             f"Paired examples: {report['n_paired']} of {report['n_examples']}. Baseline arm: `{base}`. "
             f"Parameters: `{json.dumps(report['params'], default=str)}`.", "",
             *([f"> **Note:** {report['params']['note']}", ""] if report["params"].get("note") else []),
             "Better: " + "; ".join(f"{m} {better[m]}" for m in metrics) + ". Cells: value [95% bootstrap CI].",
             "", "| arm | " + " | ".join(metrics) + " | s/example |",
             "|---" * (len(metrics) + 2) + "|"]
    for a in arms:
        cells = []
        for m in metrics:
            val, ci = report["arms"][a].get(m, math.nan), (cis.get(a) or {}).get(m)
            cells.append(_fmt(val) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""))
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {_fmt(report['cost_s'][a])} |")
    if report["deltas"]:
        lines += ["", f"Δ vs `{base}` (paired bootstrap 95% CI, {report['bootstrap']['n_boot']} resamples; "
                      f"arrow = direction that is better):", "",
                  "| arm | " + " | ".join(f"Δ {m} {_arrow(better[m])}" for m in metrics) + " |",
                  "|---" * (len(metrics) + 1) + "|"]
        for a, d in report["deltas"].items():
            cells = [f"{_fmt(d[m]['delta'])} [{_fmt(d[m]['ci_low'])}, {_fmt(d[m]['ci_high'])}]" if m in d else "–"
                     for m in metrics]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += _provenance_lines(report)
    return "\n".join(lines) + "\n"


def _title(ax, fig, text: str) -> None:
    """A title wrapped to the figure's width, so it stays inside the canvas."""
    width_chars = max(20, int(fig.get_figwidth() * 72 / 6.5))  # ~6.5 pt per character at 10 pt
    ax.set_title("\n".join(textwrap.wrap(text, width_chars)), fontsize=10)


def metric_figure(report: dict, metric: str | None = None):
    """Metric per arm (arms in run order, e.g. increasing strength), each with its 95% bootstrap CI; the
    baseline value is the dashed line (and for target metrics the target is the dotted line)."""
    from matplotlib.figure import Figure

    metric = metric or report["primary_metric"]
    arms = list(report["arms"])
    vals = [report["arms"][a].get(metric, math.nan) for a in arms]
    cis = [(report.get("ci") or {}).get(a, {}).get(metric, [v, v]) for a, v in zip(arms, vals)]
    err = [[max(v - lo, 0) for v, (lo, _) in zip(vals, cis)], [max(hi - v, 0) for v, (_, hi) in zip(vals, cis)]]
    fig = Figure(figsize=(max(4.0, 1.5 + 0.9 * len(arms)), 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.errorbar(range(len(arms)), vals, yerr=err, fmt="o-", capsize=4, label="value, 95% CI")
    ax.axhline(report["arms"][report["baseline"]].get(metric, math.nan), color="grey", lw=0.8, ls="--",
               label="baseline")
    better = (report.get("better") or {}).get(metric, "higher")
    if better.startswith("closer to"):
        ax.axhline(float(better.split()[-1]), color="green", lw=0.8, ls=":", label=f"best ({better.split()[-1]})")
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.set_ylabel(f"{metric} ({better} is better)")
    ax.legend(fontsize=7, loc="best")
    _title(ax, fig, f"{report['task']}: {metric} per arm, 95% bootstrap CI")
    return fig


def cost_figure(report: dict, metric: str | None = None):
    """Quality-vs-cost scatter: the primary metric (with its 95% CI) against mean seconds per example."""
    from matplotlib.figure import Figure

    metric = metric or report["primary_metric"]
    fig = Figure(figsize=(4.8, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for a in report["arms"]:
        x, y = report["cost_s"][a], report["arms"][a].get(metric, math.nan)
        lo, hi = (report.get("ci") or {}).get(a, {}).get(metric, [y, y])
        ax.errorbar([x], [y], yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], fmt="o", capsize=3)
        ax.annotate(a, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("seconds per example")
    ax.set_ylabel(f"{metric} ({(report.get('better') or {}).get(metric, 'higher')} is better)")
    _title(ax, fig, f"{report['task']}: quality vs cost (95% CI)")
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
