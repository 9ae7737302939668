"""What every benchmark prints about where it ran: machine, versions, threads, this checkout, the machine's load.

Example:
    >>> "torch" in environment_line()
    True
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_average() -> str:
    """The 1-minute load average as text ("?" where /proc is missing): the shared-machine context of a number."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def checkout() -> str:
    """``attnkit`` as imported (path) and the checkout's commit, so a table says which code it measured."""
    import attnkit

    where = Path(attnkit.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", ""
    return f"attnkit from {where} @ {commit}{' (+ local changes)' if dirty else ''}"


def environment_line(device: torch.device | str = "cpu") -> str:
    """One line: CPU / GPU, cores, torch (and transformers) versions, torch threads, the load average now."""
    device = torch.device(device)
    parts = [cpu_name(), f"{os.cpu_count()} cores visible", f"torch {torch.__version__}"]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    parts.append(f"{torch.get_num_threads()} threads")
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"load average {load_average()}")
    return ", ".join(parts)


def clock(kind: str):
    """The timer benchmarks read: ``"cpu"`` = this process's CPU time (``time.process_time``), ``"wall"`` =
    ``time.perf_counter``. On a shared CPU machine with ``--threads 1`` the CPU time leaves out the time other jobs
    hold the core (measured here: 5 stock SmolLM2 generates at load ~5 took 7.57–7.82 s wall, 5.06–5.21 s CPU), so
    ratios taken from it are far steadier; it still includes their cache and memory-bandwidth pressure. With several
    threads it sums them (spin-waiting included): prefer ``wall`` there, and on a GPU (synchronised)."""
    import time

    if kind not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {kind!r}")
    return time.process_time if kind == "cpu" else time.perf_counter


def default_clock(device: torch.device | str = "cpu") -> str:
    """``cpu`` for single-threaded CPU runs, ``wall`` otherwise (GPU, or several CPU threads)."""
    return "cpu" if torch.device(device).type == "cpu" and torch.get_num_threads() == 1 else "wall"



def peak_allocated(fn) -> int:
    """Peak bytes that torch's CPU allocator holds during ``fn()`` above the level before it: the profiler's
    allocation and free events (``profile_memory=True``) in time order, summed. Unlike the resident set, this sees
    every allocation, also those served from memory freed earlier."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    steps = []
    for event in prof.events():
        if event.name == "[memory]":  # frees (and allocations outside any op)
            steps.append((event.time_range.start, event.cpu_memory_usage))
        elif event.self_cpu_memory_usage:  # allocated by the op itself
            steps.append((event.time_range.start, event.self_cpu_memory_usage))
    level = peak = 0
    for _, delta in sorted(steps, key=lambda step: step[0]):
        level += delta
        peak = max(peak, level)
    return peak


def gpu_or_refusal(script: str, allow_cpu: bool) -> torch.device | None:
    """The CUDA device, or the CPU when ``allow_cpu`` (a smoke test through the Triton interpreter); None, after
    printing why to stderr, when there is no GPU and the CPU was not allowed (the script then exits with 2).

    Example:
        >>> gpu_or_refusal("x.py", allow_cpu=True).type in ("cuda", "cpu")
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    if allow_cpu:
        return torch.device("cpu")
    print(f"benchmarks/{script}: no CUDA device here; run it on a GPU machine (or --allow-cpu with TRITON_INTERPRET=1 "
          "for a smoke test)", file=sys.stderr)
    return None
