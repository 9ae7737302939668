"""The ``Task`` interface the runner drives: examples → one JSON-able record per example → aggregate metrics.

A task is a YAML file (``attnkit/eval/tasks/<name>.yaml``: ``name``, ``class``, ``params``, ``description``) plus
the class it names, which lives in the task's metric module. Records must be JSON-serialisable dicts; the runner
adds ``arm``, ``id`` and ``seconds``. Tasks that batch (POPE, CHAIR: ``batch_size`` param) override
``example_batch_size`` and ``run_batch``; the runner then appends a whole batch's records when it finishes. ``aggregate`` must work on any subset of records (the bootstrap resamples
them), and ``metrics`` lists the aggregate keys reported, with ``higher_is_better`` per key.

Example:
    >>> class Echo(Task):
    ...     metrics = ("mean",)
    ...     def examples(self, tokenizer=None): return [{"id": str(i), "x": i} for i in range(3)]
    ...     def run_example(self, model, tokenizer, ex): return {"x": ex["x"]}
    ...     def aggregate(self, recs): return {"mean": sum(r["x"] for r in recs) / len(recs)}
    >>> t = Echo("echo")
    >>> t.aggregate([t.run_example(None, None, e) for e in t.examples()])
    {'mean': 1.0}
"""

from __future__ import annotations

from typing import Any, Sequence


class Task:
    """Base class; subclasses set ``metrics`` / ``higher_is_better`` and implement the three methods."""

    metrics: tuple[str, ...] = ()
    higher_is_better: dict[str, bool] = {}
    description: str = ""

    def __init__(self, name: str, **params: Any):
        self.name = name
        self.params = params

    @property
    def primary_metric(self) -> str:
        return self.params.get("primary_metric") or self.metrics[0]

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
        return self.higher_is_better.get(metric, True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, params={self.params!r})"
