"""Run one task over several arms (baseline + interventions), paired, resumable, optionally data-parallel.

``run_eval(model, tokenizer, task, arms, limit, out_dir)``:

* ``arms`` maps an arm name to ``arm(model) -> context manager`` that applies the intervention while active;
  a list of specs is also accepted (see ``arm_from_spec``: ``"baseline"``, a recipe path/name, or
  ``"package.module:factory"``).
* Every arm runs the same first ``limit`` examples. Each finished example is appended as one JSON line to
  ``out_dir/results[.rankR].jsonl`` and flushed, so a killed run loses at most the example in flight. On restart
  finished ``(arm, id)`` pairs are skipped (a torn last line is cut off first), so nothing is duplicated.
  Tasks with ``example_batch_size > 1`` run that many examples per call and append the batch's records when it
  finishes (a kill then loses at most one batch); each record's ``seconds`` is the batch time / batch size.
* ``shard=(rank, world)`` takes examples ``rank::world`` (accelerate data parallelism); any process can resume
  any shard because completion is read from all result files.
* The report (``report.md``, ``report.json``, figures) is written from the union of all result files by
  ``write_report`` (the main process calls it after the others finish).

Example:
    >>> import contextlib
    >>> from attnkit.eval.task import Task
    >>> class Echo(Task):
    ...     metrics = ("mean",)
    ...     def examples(self, tokenizer=None): return [{"id": str(i)} for i in range(4)]
    ...     def run_example(self, model, tok, ex): return {"x": int(ex["id"]) + model["bias"]}
    ...     def aggregate(self, recs): return {"mean": sum(r["x"] for r in recs) / max(len(recs), 1)}
    >>> @contextlib.contextmanager
    ... def plus_one(model):
    ...     model["bias"] = 1; yield; model["bias"] = 0
    >>> import tempfile
    >>> rep = run_eval({"bias": 0}, None, Echo("echo"), {"baseline": null_arm, "plus": plus_one},
    ...                out_dir=tempfile.mkdtemp(), progress=False, figures=False, n_boot=50)
    >>> rep["arms"]["plus"]["mean"], rep["deltas"]["plus"]["mean"]["delta"]
    (2.5, 1.0)
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from attnkit.eval.task import Task

RESULTS_GLOB = "results*.jsonl"


@contextlib.contextmanager
def null_arm(model):
    """The baseline arm: changes nothing."""
    yield model


def arm_from_spec(spec: str) -> Callable:
    """Arm factory from a CLI spec: ``"baseline"``, ``"pkg.module:factory"`` or a recipe path/preset name.

    Recipes go through ``attnkit.attach(model, attnkit.load_recipe(spec))`` (imported lazily); the returned
    handle is used as the context manager.
    """
    if spec == "baseline":
        return null_arm
    if ":" in spec and not os.path.exists(spec):
        module, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module), attr)

    def recipe_arm(model):
        import attnkit

        return attnkit.attach(model, attnkit.load_recipe(spec))

    return recipe_arm


def arm_name(spec: str) -> str:
    """Short arm name from a spec: file stem for paths, attribute name for ``module:factory``."""
    if spec == "baseline":
        return spec
    if ":" in spec and not os.path.exists(spec):
        return spec.rpartition(":")[2]
    return Path(spec).stem


def normalize_arms(arms) -> dict[str, Callable]:
    """Accept a mapping name → factory or a sequence of specs; names must be unique."""
    if isinstance(arms, Mapping):
        return dict(arms)
    out: dict[str, Callable] = {}
    for spec in arms:
        name = arm_name(spec)
        if name in out:
            raise ValueError(f"two arms are both named {name!r}; rename one of the recipe files.")
        out[name] = arm_from_spec(spec)
    return out


# ------------------------------------------------------------------------------------------ result files
def _repair_tail(path: Path) -> None:
    """Cut a torn final line (a write interrupted by a kill) so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        fh.truncate(data.rfind(b"\n") + 1)


def read_records(out_dir: str | Path) -> list[dict]:
    """All records of all result files, first occurrence of each ``(arm, id)`` kept (torn last lines skipped)."""
    seen, out = set(), []
    for path in sorted(Path(out_dir).glob(RESULTS_GLOB)):
        lines = path.read_text().split("\n")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if lineno == len(lines):  # torn tail of a file another process is still writing
                    continue
                raise ValueError(f"{path}:{lineno}: not valid JSON; delete that line to resume.") from None
            key = (rec["arm"], rec["id"])
            if key not in seen:
                seen.add(key)
                out.append(rec)
    return out


def _check_run_config(out_dir: Path, config: dict) -> None:
    path = out_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("task") != config["task"] or old.get("params") != config["params"]:
            raise ValueError(f"{out_dir} holds results of task {old.get('task')!r} with params {old.get('params')}; "
                             f"resuming with {config['task']!r} {config['params']} would mix them. Use a new --out.")
    else:
        path.write_text(json.dumps(config, indent=2, default=str))


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def run_shard(model, tokenizer, task: Task, arms: Mapping[str, Callable], examples: Sequence[dict],
              out_dir: Path, rank: int = 0, world: int = 1, progress: bool = True) -> int:
    """Run this process's share of ``examples`` for every arm, appending records; returns how many were run."""
    from tqdm.auto import tqdm

    mine = [ex for i, ex in enumerate(examples) if i % world == rank]
    path = out_dir / (f"results.rank{rank}.jsonl" if world > 1 else "results.jsonl")
    _repair_tail(path)
    done = {(r["arm"], r["id"]) for r in read_records(out_dir)}
    todo = {arm: [ex for ex in mine if (arm, ex["id"]) not in done] for arm in arms}
    total = len(arms) * len(mine)
    bar = tqdm(total=total, initial=total - sum(map(len, todo.values())), disable=not progress,
               desc=f"{task.name}[{rank}/{world}]")
    ran = 0
    with open(path, "a") as fh:
        for arm, pending in todo.items():
            if not pending:
                continue
            size = max(1, int(task.example_batch_size))
            with arms[arm](model):
                for start in range(0, len(pending), size):
                    batch = pending[start:start + size]
                    t0 = time.perf_counter()
                    recs = task.run_batch(model, tokenizer, batch)
                    if len(recs) != len(batch):
                        raise RuntimeError(f"task {task.name!r}: run_batch returned {len(recs)} records for "
                                           f"{len(batch)} examples.")
                    seconds = (time.perf_counter() - t0) / len(batch)
                    for ex, rec in zip(batch, recs):
                        rec.update(arm=arm, id=ex["id"], seconds=seconds)
                        fh.write(json.dumps(rec, default=_json_default) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                    ran += len(batch)
                    bar.update(len(batch))
    bar.close()
    return ran


def run_eval(model, tokenizer, task: Task | str, arms, limit: int | None = None, out_dir: str | Path = "eval_out",
             shard: tuple[int, int] = (0, 1), progress: bool = True, write: bool = True, figures: bool = True,
             n_boot: int = 1000, seed: int = 0, barrier: Callable | None = None) -> dict | None:
    """Run ``task`` for every arm on the same examples and write the report; see the module docstring.

    Returns the report dict on the main process (rank 0), ``None`` on the others.
    """
    from attnkit.eval.registry import get_task

    task = get_task(task) if isinstance(task, str) else task
    arms = normalize_arms(arms)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = task.examples(tokenizer)
    examples = examples[:limit] if limit is not None else examples
    ids = [ex["id"] for ex in examples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {task.name!r} yields duplicate example ids; ids must be unique.")
    rank, world = shard
    if rank == 0:
        _check_run_config(out_dir, {"task": task.name, "params": task.params, "arms": list(arms)})
    if barrier:
        barrier()
    run_shard(model, tokenizer, task, arms, examples, out_dir, rank, world, progress)
    if barrier:
        barrier()
    if rank != 0:
        return None
    from attnkit.eval.report import build_report, write_report

    report = build_report(task, list(arms), ids, read_records(out_dir), n_boot=n_boot, seed=seed)
    if write:
        write_report(report, task, read_records(out_dir), out_dir, figures=figures)
    return report
