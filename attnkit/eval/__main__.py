"""Command line: ``python -m attnkit.eval`` (and ``accelerate launch -m attnkit.eval`` for data parallelism).

Example:
    python -m attnkit.eval --model smollm2 --task truthfulqa_mc --recipes baseline var.yaml --limit 20 --out runs/tqa
    python -m attnkit.eval --model tiny-llava --task chair --recipes baseline var-auto --limit 8 --out runs/chair
    accelerate launch --num_processes 2 -m attnkit.eval --model smollm2 --task wikitext2_ppl --limit 8 --out runs/ppl

On CPU-only machines ``accelerate launch --cpu`` starts one process unless MPI is set up; use
``accelerate launch --multi_gpu --num_processes 2 ...`` (torchrun launcher): with no CUDA we join a gloo group.

``--recipes`` takes ``baseline``, recipe paths or preset names (applied with ``attnkit.attach``), or
``package.module:factory`` callables ``factory(model) -> context manager``. ``--set key=value`` overrides a task
parameter (values parsed as YAML: ``--set context_lengths=[500,1000]``). Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import sys

import yaml

TINY_LLAVA = {"tiny-llava", "tiny_llava"}  # the random tiny LLaVA + word-level processor (pipeline checks only)


def parse_args(argv=None) -> argparse.Namespace:
    from attnkit.eval.registry import list_tasks

    p = argparse.ArgumentParser(prog="attnkit eval", description=__doc__.split("\n\n")[0],
                                epilog=f"tasks: {', '.join(list_tasks())}")
    p.add_argument("--model", required=True, help="'smollm2', 'tiny-llava' (random weights: pipeline check) or a "
                                                  "local path / hub name for from_pretrained")
    p.add_argument("--task", required=True, help="registered task name or a task YAML file")
    p.add_argument("--recipes", nargs="+", default=["baseline"], help="arms: baseline, recipe files, module:factory")
    p.add_argument("--limit", type=int, default=None, help="first N examples of the task")
    p.add_argument("--out", required=True, help="output folder (results*.jsonl, report.md/json, figures)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a task parameter (YAML value)")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "float16", "bfloat16"])
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def parse_overrides(items) -> dict:
    """``["a=1", "b=[1,2]"]`` → ``{"a": 1, "b": [1, 2]}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}.")
        out[key] = yaml.safe_load(value)
    return out


def _distributed():
    """(rank, world, barrier, device) from accelerate when launched with >1 process, else single-process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None, None
    import torch
    from accelerate import PartialState

    # On a machine without CUDA, accelerate only forms a process group (gloo) when asked for CPU explicitly.
    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone, state.device


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from attnkit.eval.registry import get_task
    from attnkit.eval.report import to_markdown
    from attnkit.eval.runner import run_eval
    from attnkit.models import load_model

    rank, world, barrier, device = _distributed()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    overrides = parse_overrides(args.overrides)
    if args.model.lower() in TINY_LLAVA:
        from attnkit.eval.lvlm import RANDOM_WEIGHTS_NOTE, tiny_llava

        model, tokenizer = tiny_llava()
        overrides.setdefault("note", RANDOM_WEIGHTS_NOTE)
    else:
        model, tokenizer = load_model(args.model, dtype=dtype)
    if device is not None:
        model.to(device)
    task = get_task(args.task, **overrides)
    report = run_eval(model, tokenizer, task, args.recipes, limit=args.limit, out_dir=args.out,
                      shard=(rank, world), progress=not args.no_progress, figures=not args.no_figures,
                      n_boot=args.n_boot, seed=args.seed, barrier=barrier)
    if report is not None:
        sys.stdout.write(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
