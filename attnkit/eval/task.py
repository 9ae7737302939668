"""The ``Task`` interface the runner drives: examples → one JSON-able record per example → aggregate metrics.

A task is a YAML file (``attnkit/eval/tasks/<name>.yaml``: ``name``, ``class``, ``params``, ``description``,
optionally ``include``) plus the class it names, which lives in the task's metric module. The class lists its
parameters in ``params_spec`` (type, default, help; see :mod:`attnkit.eval.params`): YAML files and overrides are
checked against it and the defaults are filled in, so ``task.params`` is the complete, effective configuration
(a class without ``params_spec`` accepts any parameters). Records must be JSON-serialisable dicts; the runner adds
``arm``, ``id`` and ``seconds``. Tasks that batch (POPE, CHAIR: ``batch_size`` param) override
``example_batch_size`` and ``run_batch``; the runner then appends a whole batch's records when it finishes.
``aggregate`` must work on any subset of records (the bootstrap resamples them), and ``metrics`` lists the
aggregate keys reported, with ``higher_is_better`` per key, or ``metric_targets`` for metrics that are best at
a value (POPE's yes-ratio: 0.5). ``required_files`` names the data a run reads, so a missing file is reported
before any model loads.

Example:
    >>> class Echo(Task):
    ...     metrics = ("mean",)
    ...     def examples(self, tokenizer=None): return [{"id": str(i), "x": i} for i in range(3)]
    ...     def run_example(self, model, tokenizer, ex): return {"x": ex["x"]}
    ...     def aggregate(self, recs): return {"mean": sum(r["x"] for r in recs) / len(recs)}
    >>> t = Echo("echo")
    >>> t.aggregate([t.run_example(None, None, e) for e in t.examples()])
    {'mean': 1.0}
    >>> t.better("mean")
    'higher'
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Mapping, Sequence

from attnkit.eval.errors import EvalError
from attnkit.eval.params import Param, check_params

COMMON_PARAMS = {
    "note": Param(str | None, None, "a note printed above the report table (e.g. 'random weights')"),
    "primary_metric": Param(str | None, None, "the metric the figures plot (default: the first metric)"),
}


class _Blank(dict):
    def __missing__(self, key):
        return "{" + key + "}"


class Task:
    """Base class; subclasses set ``metrics`` / ``higher_is_better`` and implement the three methods."""

    metrics: tuple[str, ...] = ()
    higher_is_better: dict[str, bool] = {}
    metric_targets: dict[str, float] = {}
    params_spec: dict[str, Param] | None = None
    description: str = ""

    def __init__(self, name: str, **params: Any):
        self.name = name
        self.params = self.check_params(params, f"task {name!r}")

    @classmethod
    def check_params(cls, params: Mapping, source: str, lines: Mapping | None = None) -> dict:
        """``params`` validated against ``params_spec`` (defaults filled in); unchecked without a spec."""
        if cls.params_spec is None:
            return dict(params)
        return check_params({**COMMON_PARAMS, **cls.params_spec}, params, source, lines)

    @property
    def primary_metric(self) -> str:
        return self.params.get("primary_metric") or self.metrics[0]

    def describe(self) -> str:
        """The description shown in reports: the YAML ``description`` with ``{param}`` placeholders filled."""
        shown = {k: ("default" if v is None else v) for k, v in self.params.items()}
        return string.Formatter().vformat(self.description or "", (), _Blank(shown))

    def required_files(self) -> list[Path]:
        """Files a run of this task reads (checked by ``check_data`` before the model loads)."""
        return []

    def check_data(self) -> None:
        """Raise :class:`EvalError` naming the first missing data file and how to point attnkit at it."""
        for path in self.required_files():
            if not Path(path).exists():
                from attnkit.data import ENV_VAR, data_root

                root, why = data_root()
                raise EvalError(f"task {self.name!r} needs {path}, which does not exist (data root {root}, {why}); "
                                f"set {ENV_VAR} to the folder holding the data sets or pass the file as a parameter.")

    def examples(self, tokenizer=None) -> list[dict]:
        """Every example of the task, in a fixed order; each has a unique string ``id``."""
        raise NotImplementedError

    def run_example(self, model, tokenizer, example: dict) -> dict:
        """Run the model on one example and return its JSON-serialisable record."""
        raise NotImplementedError

    @property
    def example_batch_size(self) -> int:
        """Examples the runner hands to one ``run_batch`` call (1 unless a task batches, e.g. generation)."""
        return 1

    def run_batch(self, model, tokenizer, examples: Sequence[dict]) -> list[dict]:
        """Records of several examples at once; the default runs them one by one."""
        return [self.run_example(model, tokenizer, ex) for ex in examples]

    def aggregate(self, records: Sequence[dict]) -> dict:
        """Metrics over a list of this task's records."""
        raise NotImplementedError

    def figures(self, records_by_arm: dict[str, list[dict]]) -> dict:
        """Optional task-specific matplotlib figures ``{file stem: Figure}``."""
        return {}

    def is_better(self, metric: str) -> bool:
        """Whether a larger value is better (metrics with a target value: ``False``; see ``better``)."""
        return metric not in self.metric_targets and self.higher_is_better.get(metric, True)

    def better(self, metric: str) -> str:
        """``"higher"``, ``"lower"`` or ``"closer to X"`` — what counts as better for ``metric``."""
        if metric in self.metric_targets:
            return f"closer to {self.metric_targets[metric]:g}"
        return "higher" if self.higher_is_better.get(metric, True) else "lower"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, params={self.params!r})"
