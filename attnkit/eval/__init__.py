"""attnkit.eval — hallucination, quality and cost of baseline vs recipes, side by side, resumable, data-parallel.

Example:
    >>> from attnkit.eval import list_tasks
    >>> list_tasks()[:3]
    ['chair', 'cost', 'niah']

Typical use::

    from attnkit.eval import run_eval
    report = run_eval(model, tokenizer, "truthfulqa_mc", ["baseline", "var.yaml"], limit=50, out_dir="runs/tqa")

or ``python -m attnkit.eval --model smollm2 --task pope_random --recipes baseline var.yaml --limit 50 --out DIR``.
Results record what produced them (``run.json``: model, dtype, device, each recipe's YAML and sha256, versions,
git commit, date); mistakes in the task, its parameters, the data, the arms or the output folder are reported as
one-sentence :class:`EvalError` s before anything runs.
"""

from attnkit.eval.errors import EvalError
from attnkit.eval.params import Param
from attnkit.eval.registry import get_task, list_tasks, register_task_file
from attnkit.eval.runner import arm_from_spec, null_arm, read_records, run_eval
from attnkit.eval.task import Task

__all__ = ["EvalError", "Param", "Task", "arm_from_spec", "get_task", "list_tasks", "null_arm", "read_records",
           "register_task_file", "run_eval"]
