"""Command line: ``python -m attnkit.eval`` (or ``attnkit eval``); data parallel with ``torchrun`` or accelerate.

Example:
    python -m attnkit.eval --model smollm2 --task truthfulqa_mc --recipes baseline var.yaml --limit 20 --out runs/tqa
    python -m attnkit.eval --model tiny-llava --task chair --recipes baseline var-auto --limit 8 --out runs/chair
    torchrun --nproc_per_node 2 -m attnkit.eval --model smollm2 --task wikitext2_ppl --limit 8 --out runs/ppl
    accelerate launch --multi_gpu --num_processes 2 -m attnkit.eval --model smollm2 --task wikitext2_ppl ...

On CPU, ``torchrun --nproc_per_node N`` starts N processes (a gloo group); ``accelerate launch --cpu
--num_processes N`` starts one unless MPI is set up (the run says so). Each process prints its rank and world
size at start. ``--device`` (default ``auto``: the GPU when there is one) and ``--dtype`` choose where and in what
precision the model runs.

``--recipes`` takes ``baseline``, recipe paths or preset names (applied with ``attnkit.attach``), or
``package.module:factory`` callables ``factory(model) -> context manager``. ``--set key=value`` overrides a task
parameter (values parsed as YAML: ``--set context_lengths=[500,1000]``). Re-running the same command resumes.

Everything that can be checked without the model is checked before it loads (task name, ``--set`` keys and
types, the data files the task reads, ``--limit``, every recipe, the output folder's ``run.json``); after loading,
every arm is attached and removed once before any arm runs. A user error prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from attnkit.eval.errors import EvalError

TINY_LLAVA = {"tiny-llava", "tiny_llava"}  # the random tiny LLaVA + word-level processor (pipeline checks only)
DTYPES = ("auto", "float32", "float16", "bfloat16")
PROG = "attnkit eval"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``attnkit eval: error: …``) and exit 2."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (the first N examples), got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    from attnkit.eval.registry import list_tasks

    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=f"tasks: {', '.join(list_tasks())}")
    p.add_argument("--model", required=True, help="'smollm2', 'tiny-llava' (random weights: pipeline check) or a "
                                                  "local path / hub name for from_pretrained")
    p.add_argument("--revision", default=None, help="model revision (hub branch, tag or commit) for from_pretrained")
    p.add_argument("--task", required=True, help="registered task name or a task YAML file")
    p.add_argument("--recipes", nargs="+", default=["baseline"], help="arms: baseline, recipe files, module:factory")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N examples of the task")
    p.add_argument("--out", required=True, help="output folder (results*.jsonl, run.json, report.md/json, figures)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a task parameter (YAML value)")
    p.add_argument("--device", default="auto", help="auto (GPU if available, else CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype (auto: float32)")
    p.add_argument("--n-boot", type=_positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def parse_overrides(items) -> dict:
    """``["a=1", "b=[1,2]"]`` → ``{"a": 1, "b": [1, 2]}``.

    Example:
        >>> parse_overrides(["limit_x=3", "lengths=[1, 2]", "name=abc"])
        {'limit_x': 3, 'lengths': [1, 2], 'name': 'abc'}
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EvalError(f"--set expects KEY=VALUE, got {item!r}.")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise EvalError(f"--set {item}: the value is not valid YAML; quote it or fix the brackets.") from None
    return out


def _launch_note(world: int) -> str | None:
    """A warning when a launcher was asked for several processes but this is the only one."""
    if world == 1 and "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ:
        return ("accelerate launch was asked for several processes but started only this one (without --multi_gpu "
                "it runs one process, and --cpu needs MPI for more); running on 1 process. For N CPU processes use "
                "`torchrun --nproc_per_node N -m attnkit.eval ...`.")
    return None


def _distributed(device: str):
    """(rank, world, barrier, device) from torchrun / accelerate when there are >1 processes, else single."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None, resolve_device(device)
    from accelerate import PartialState

    # On a machine without CUDA, accelerate only forms a process group (gloo) when asked for CPU explicitly.
    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return state.process_index, state.num_processes, state.wait_for_everyone, state.device


def resolve_device(device: str):
    """``auto`` → ``cuda`` when available (else ``mps``, else ``cpu``); other names are checked for availability.

    Example:
        >>> str(resolve_device("cpu"))
        'cpu'
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EvalError(f"--device {device!r} is not a device name; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device} was asked for but this torch build sees no CUDA GPU; use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise EvalError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise EvalError(f"--device {device} was asked for but MPS is not available here; use --device cpu.")
    return dev


def _prepare(args):
    """Everything that needs no model: task, overrides, data files, arms; returns (task, arms)."""
    from attnkit.eval.registry import get_task
    from attnkit.eval.runner import normalize_arms

    overrides = parse_overrides(args.overrides)
    if args.model.lower() in TINY_LLAVA:
        from attnkit.eval.lvlm import RANDOM_WEIGHTS_NOTE

        overrides.setdefault("note", RANDOM_WEIGHTS_NOTE)
    task = get_task(args.task, **overrides)
    task.check_data()
    return task, normalize_arms(args.recipes)


def _load(args, dtype, device):
    """The model and its tokenizer/processor; loading failures become one-line user errors."""
    if args.model.lower() in TINY_LLAVA:
        from attnkit.eval.lvlm import tiny_llava

        model, tokenizer = tiny_llava()
        if dtype is not None:
            model.to(dtype)
    else:
        from attnkit.models import load_model

        kwargs = {"revision": args.revision} if args.revision else {}
        try:
            model, tokenizer = load_model(args.model, dtype=dtype, **kwargs)
        except (OSError, ValueError, ImportError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EvalError(f"--model {args.model!r} could not be loaded: {first}") from None
    return model.to(device), tokenizer


def main(argv=None) -> int:
    """Run the command line; returns the exit status (2 for a user error, printed as one line)."""
    from attnkit.recipes import RecipeError

    try:
        return _main(argv)
    except (EvalError, RecipeError, FileNotFoundError) as err:  # a user's mistake: one line, no traceback
        sys.stderr.write(f"{PROG}: error: {err}\n")
        return 2


def _main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from attnkit.eval.report import to_markdown
    from attnkit.eval.runner import check_resumable, run_config, run_eval

    task, arms = _prepare(args)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model_name = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    early = run_config(task, arms, None, model_name)
    early["model"]["dtype"] = str(dtype or torch.float32)
    check_resumable(args.out, early)  # before loading: same task, params, recipes, model name and dtype
    rank, world, barrier, device = _distributed(args.device)
    sys.stderr.write(f"{PROG}: process {rank}/{world} (rank/world) on {device}\n")
    note = _launch_note(world)
    if note:
        sys.stderr.write(f"{PROG}: warning: {note}\n")
    model, tokenizer = _load(args, dtype, device)
    report = run_eval(model, tokenizer, task, arms, limit=args.limit, out_dir=args.out, shard=(rank, world),
                      progress=not args.no_progress, figures=not args.no_figures, n_boot=args.n_boot,
                      seed=args.seed, barrier=barrier, model_name=model_name)
    if report is not None:
        sys.stdout.write(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
