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
* Before any example runs, every arm is attached and removed once (``preflight_arms``), and ``run.json`` — which
  records the task, its parameters, each arm's recipe YAML and sha256, the model (name or path, revision, dtype,
  device), package versions, the git commit and the date — must agree with this run, else it is refused with one
  sentence (``check_resumable``). The progress bar names the arm and the example it is on.

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

from attnkit.eval.errors import EvalError
from attnkit.eval.task import Task

RESULTS_GLOB = "results*.jsonl"


@contextlib.contextmanager
def null_arm(model):
    """The baseline arm: changes nothing."""
    yield model


null_arm.info = {"kind": "baseline"}


def _recipe_arm(recipe) -> Callable:
    """Arm factory attaching ``recipe`` with ``attnkit.attach``; the handle is the context manager."""
    from attnkit.eval.provenance import recipe_info

    def recipe_arm(model):
        import attnkit

        return attnkit.attach(model, recipe)

    recipe_arm.info = recipe_info(recipe)
    recipe_arm.recipe = recipe
    return recipe_arm


def arm_from_spec(spec) -> Callable:
    """Arm factory from a CLI spec: ``"baseline"``, ``"pkg.module:factory"``, a recipe path / preset name, or a
    :class:`~attnkit.recipes.Recipe`.

    Recipes are loaded and validated here (before any model is loaded): a misspelled preset, a missing file or
    an invalid recipe raises :class:`~attnkit.eval.errors.EvalError`. The factory carries ``.info`` (the recipe's
    YAML and sha256, for ``run.json``) and attaches with ``attnkit.attach(model, recipe)``.

    Example:
        >>> arm = arm_from_spec("noop")
        >>> arm.info["kind"], arm.info["name"], len(arm.info["sha256"])
        ('recipe', 'noop', 64)
        >>> arm_from_spec("noopp")
        Traceback (most recent call last):
        ...
        attnkit.eval.errors.EvalError: arm 'noopp': unknown recipe 'noopp'; did you mean 'noop'? ...
    """
    import attnkit

    if isinstance(spec, attnkit.Recipe):
        return _recipe_arm(spec)
    if spec == "baseline":
        return null_arm
    if ":" in spec and not os.path.exists(spec):
        module, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise EvalError(f"arm {spec!r}: cannot import {attr!r} from module {module!r} ({err}); give "
                            f"package.module:factory with factory(model) -> context manager.") from None
        return _callable_arm(factory, spec)
    try:
        recipe = attnkit.load_recipe(spec)
    except (attnkit.RecipeError, KeyError, FileNotFoundError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise EvalError(f"arm {spec!r}: {message}") from None
    return _recipe_arm(recipe)


def _callable_arm(factory: Callable, spec: str | None = None) -> Callable:
    """Wrap a ``factory(model) -> context manager`` so it carries ``.info`` (its import name)."""
    if getattr(factory, "info", None) is not None:
        return factory
    name = spec or f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"

    def arm(model):
        return factory(model)

    arm.info = {"kind": "callable", "name": name}
    return arm


def arm_name(spec) -> str:
    """Short arm name from a spec: file stem for paths, attribute name for ``module:factory``, recipe name."""
    if not isinstance(spec, str):
        return spec.name
    if spec == "baseline":
        return spec
    if ":" in spec and not os.path.exists(spec):
        return spec.rpartition(":")[2]
    return Path(spec).stem


def normalize_arms(arms) -> dict[str, Callable]:
    """Accept a mapping name → factory (or → Recipe / spec) or a sequence of specs; names must be unique.

    Every returned factory carries ``.info`` describing it (``kind`` baseline / recipe / callable).
    """
    if isinstance(arms, (str, bytes)):
        arms = [arms]
    if isinstance(arms, Mapping):
        return {name: (arm_from_spec(a) if isinstance(a, str) or not callable(a) else _callable_arm(a))
                for name, a in arms.items()}
    out: dict[str, Callable] = {}
    for spec in arms:
        name = arm_name(spec)
        if name in out:
            raise EvalError(f"two arms are both named {name!r}; rename one of the recipe files.")
        out[name] = arm_from_spec(spec)
    return out


def arms_info(arms: Mapping[str, Callable]) -> dict:
    """``{arm name: info}`` for ``run.json`` and the report."""
    return {name: dict(getattr(factory, "info", None) or {"kind": "callable"}) for name, factory in arms.items()}


def preflight_arms(model, arms: Mapping[str, Callable]) -> None:
    """Attach and remove every arm once before any arm runs, so an arm that cannot act on this model fails in
    seconds instead of after the baseline's run. Recipe arms: ``attnkit.attach(model, recipe)`` then
    ``handle.remove()``; other arms: enter and leave their context manager."""
    for name, factory in arms.items():
        if factory is null_arm:
            continue
        try:
            recipe = getattr(factory, "recipe", None)
            if recipe is not None:
                import attnkit

                attnkit.attach(model, recipe).remove()
            else:
                with factory(model):
                    pass
        except Exception as err:  # noqa: BLE001 - any failure here is reported as this arm's problem
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EvalError(f"arm {name!r} cannot be attached to this model ({type(model).__name__}): {first}") \
                from err


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


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def check_resumable(out_dir: str | Path, config: dict) -> None:
    """Refuse (one sentence) to add results to ``out_dir`` when its ``run.json`` was made with another task,
    task parameters, model, model revision, dtype or arm recipe; fields not known yet are not compared."""
    from attnkit.eval.provenance import mismatch

    path = Path(out_dir) / "run.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise EvalError(f"{path} is not valid JSON; repair it or use a new --out.") from None
    diff = mismatch(old, _jsonable(config))
    if diff:
        raise EvalError(f"{out_dir} holds results made with {diff}; resuming would mix the two, so use a new --out "
                        f"or rerun with the same settings.")


def _write_run_config(out_dir: Path, config: dict) -> dict:
    """Check ``run.json`` against ``config`` and write the merged configuration (new arms added, each session's
    date and device appended to ``sessions``); returns what was written."""
    check_resumable(out_dir, config)
    path = out_dir / "run.json"
    config = _jsonable(config)
    session = config.pop("session", {})
    if path.exists():
        old = json.loads(path.read_text())
        old["arms"] = {**old.get("arms", {}), **config.get("arms", {})}
        for key, value in config.items():
            old.setdefault(key, value)
        config = old
    config.setdefault("sessions", []).append(session)
    path.write_text(json.dumps(config, indent=2))
    return config


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _progress(task: Task, total: int, done: int, rank: int, world: int, enabled: bool):
    """A tqdm bar whose description names the task, process, arm and example it is on."""
    from tqdm.auto import tqdm

    where = f" [{rank}/{world}]" if world > 1 else ""
    return tqdm(total=total, initial=done, disable=not enabled, desc=f"{task.name}{where}", unit="ex",
                dynamic_ncols=True)


def run_shard(model, tokenizer, task: Task, arms: Mapping[str, Callable], examples: Sequence[dict],
              out_dir: Path, rank: int = 0, world: int = 1, progress: bool = True) -> int:
    """Run this process's share of ``examples`` for every arm, appending records; returns how many were run."""
    mine = [ex for i, ex in enumerate(examples) if i % world == rank]
    path = out_dir / (f"results.rank{rank}.jsonl" if world > 1 else "results.jsonl")
    _repair_tail(path)
    done = {(r["arm"], r["id"]) for r in read_records(out_dir)}
    todo = {arm: [ex for ex in mine if (arm, ex["id"]) not in done] for arm in arms}
    total = len(arms) * len(mine)
    bar = _progress(task, total, total - sum(map(len, todo.values())), rank, world, progress)
    ran = 0
    with open(path, "a") as fh:
        for arm, pending in todo.items():
            if not pending:
                continue
            size = max(1, int(task.example_batch_size))
            with arms[arm](model):
                for start in range(0, len(pending), size):
                    batch = pending[start:start + size]
                    ids = batch[0]["id"] if len(batch) == 1 else f"{batch[0]['id']}…{batch[-1]['id']}"
                    bar.set_description_str(f"{task.name}{f' [{rank}/{world}]' if world > 1 else ''} · arm {arm}")
                    bar.set_postfix_str(f"example {ids}", refresh=True)
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


def check_limit(limit) -> int | None:
    """``limit`` as a positive int (or ``None``: every example); anything else is an :class:`EvalError`."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise EvalError(f"limit must be a positive integer (the first N examples), got {limit!r}.")
    return limit


def run_config(task: Task, arms: Mapping[str, Callable], model=None, model_name: str | None = None,
               limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> dict:
    """What ``run.json`` records: task, parameters, arms (recipe YAML + sha256), model, versions, git, date."""
    from attnkit.eval.provenance import git_commit, model_info, now, versions

    model_part = model_info(model, model_name) if model is not None else {"name_or_path": model_name}
    return {"task": task.name, "description": task.describe(), "params": task.params, "arms": arms_info(arms),
            "model": model_part, "versions": versions(), "git": git_commit(), "created": now(),
            "session": {"date": now(), "limit": limit, "world": shard[1], "device": model_part.get("device")}}


def run_eval(model, tokenizer, task: Task | str, arms, limit: int | None = None, out_dir: str | Path = "eval_out",
             shard: tuple[int, int] = (0, 1), progress: bool = True, write: bool = True, figures: bool = True,
             n_boot: int = 1000, seed: int = 0, barrier: Callable | None = None,
             model_name: str | None = None, preflight: bool = True) -> dict | None:
    """Run ``task`` for every arm on the same examples and write the report; see the module docstring.

    Before anything runs: ``limit`` is checked, the output folder's ``run.json`` must agree with this run (task,
    parameters, model, dtype, arm recipes; see :func:`check_resumable`), and every arm is attached and removed
    once (``preflight``). ``model_name`` names the model in ``run.json`` when its config does not (e.g. a
    packaged model). Returns the report dict on the main process (rank 0), ``None`` on the others.
    """
    from attnkit.eval.registry import get_task

    limit = check_limit(limit)
    task = get_task(task) if isinstance(task, str) else task
    arms = normalize_arms(arms)
    out_dir = Path(out_dir)
    rank, world = shard
    config = run_config(task, arms, model, model_name, limit, shard)
    check_resumable(out_dir, config)
    if preflight:
        preflight_arms(model, arms)
    examples = task.examples(tokenizer)
    examples = examples[:limit] if limit is not None else examples
    ids = [ex["id"] for ex in examples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {task.name!r} yields duplicate example ids; ids must be unique.")
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _write_run_config(out_dir, config)
    if barrier:
        barrier()
    run_shard(model, tokenizer, task, arms, examples, out_dir, rank, world, progress)
    if barrier:
        barrier()
    if rank != 0:
        return None
    from attnkit.eval.report import build_report, write_report

    provenance = json.loads((out_dir / "run.json").read_text())
    report = build_report(task, list(arms), ids, read_records(out_dir), n_boot=n_boot, seed=seed,
                          provenance=provenance)
    if write:
        write_report(report, task, read_records(out_dir), out_dir, figures=figures)
    return report
