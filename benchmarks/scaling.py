"""Scaling table: time and peak memory against the sequence length N for stock SDPA, eager, torch, flex (and triton on
a GPU), with the measured memory growth factor per doubling of N (linear memory: ~2; materialised N²: ~4).

Same workload and measurement as ``benchmarks/attention.py`` (B=1, H=8, D=64, fp32, causal, LLaVA-like groups;
every cell timed alternately with stock SDPA, best of r, process CPU time with ``--threads 1``). Peak memory is the
peak of torch's CPU allocator during one call above the level before it, from the profiler's allocation and free
events (``benchmarks/_common.py``); on CUDA ``torch.cuda.max_memory_allocated`` above the inputs.

    python benchmarks/scaling.py --threads 1 --markdown           # N = 512 … 16384 (eager up to 4096)
    python benchmarks/scaling.py --n 512 1024 2048 --edits none reweight --backends torch
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout's attnkit
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import attention as A  # noqa: E402
from _common import checkout, clock, default_clock, environment_line, load_average  # noqa: E402

def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    backends = A.backends_for(args, device)
    rows = []
    for N in args.n:
        x = A.make_inputs(N, 1, args.heads, args.dim, dtype, device)
        reps = args.repeats if N <= 2048 else 1
        t_sdpa, _, m_sdpa = A.measure(lambda: A.sdpa(x), lambda: A.sdpa(x), reps, device)
        rows.append(dict(N=N, edit="(stock)", backend="sdpa", ms=t_sdpa * 1e3, sdpa=1.0, mb=m_sdpa / 2**20))
        print(_fmt(rows[-1]), flush=True)
        for edit in args.edits:
            for backend in backends:
                if backend == "eager" and N > args.eager_max_n:
                    continue
                fn = A.functions(backend, device)[edit]
                if isinstance(fn, str):
                    continue
                note = ""
                if backend == "flex":
                    start = time.perf_counter()
                    fn(x)
                    note = f"compile {time.perf_counter() - start:.0f} s"
                t, t_ref, m = A.measure(lambda: fn(x), lambda: A.sdpa(x), reps, device)
                rows.append(dict(N=N, edit=edit, backend=backend, ms=t * 1e3, sdpa=t / t_ref, mb=m / 2**20,
                                 note=note))
                print(_fmt(rows[-1]), flush=True)
        del x
    return rows


def growth(rows: list[dict]) -> dict[tuple[str, str], list[float | None]]:
    """(edit, backend) → peak-memory ratio between consecutive N (per doubling when N doubles)."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault((r["edit"], r["backend"]), []).append((r["N"], r["mb"]))
    out = {}
    for key, points in series.items():
        ratios = []
        for (n0, m0), (n1, m1) in zip(points, points[1:]):
            per_doubling = (m1 / m0) ** (1 / max(1e-9, math.log2(n1 / n0))) if m0 > 0.01 else None
            ratios.append(per_doubling)
        out[key] = ratios
    return out


def _fmt(r: dict) -> str:
    return (f"{r['N']:>6} | {r['edit']:<12} | {r['backend']:<6} | {r['ms']:10.1f} | {r['sdpa']:6.2f} | "
            f"{r['mb']:9.2f} {r.get('note', '')}")


def markdown(rows: list[dict]) -> str:
    ns = sorted({r["N"] for r in rows})
    keys = list(dict.fromkeys((r["edit"], r["backend"]) for r in rows))
    cell = {(r["edit"], r["backend"], r["N"]): r for r in rows}
    grow = growth(rows)
    head = "| edit | backend | " + " | ".join(f"N={n}: ms (×SDPA) / MiB" for n in ns) + " | MiB growth per doubling |"
    out = [head, "|" + "---|" * (len(ns) + 3)]
    for edit, backend in keys:
        cells = []
        for n in ns:
            r = cell.get((edit, backend, n))
            cells.append("—" if r is None else f"{r['ms']:.0f} ({r['sdpa']:.2f}) / {r['mb']:.1f}")
        ratios = [f"{g:.1f}" if g is not None else "—" for g in grow[(edit, backend)]]
        out.append(f"| {edit} | {backend} | " + " | ".join(cells) + f" | {', '.join(ratios) or '—'} |")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--edits", nargs="+", default=["none", "bias", "reweight", "key_mass"], choices=list(A.EAGER))
    ap.add_argument("--backends", nargs="+", default=["eager", "torch", "flex", "triton"],
                    choices=["eager", "torch", "flex", "triton"])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3, help="best of, N <= 2048 (1 above)")
    ap.add_argument("--eager-max-n", type=int, default=4096, help="largest N for the materialised eager baseline")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.clock = args.clock or default_clock(dev)
    A.TIMER = clock(args.clock) if dev.type == "cpu" else time.perf_counter
    print(f"machine: {environment_line(dev)}")
    print(checkout())
    print(f"B=1 H={args.heads} D={args.dim} {args.dtype} causal; time: {args.clock if dev.type == 'cpu' else 'wall'}; "
          f"memory: {'cuda max_memory_allocated' if dev.type == 'cuda' else 'peak of the CPU allocator (profiler)'}")
    print(f"{'N':>6} | {'edit':<12} | {'backend':<6} | {'ms':>10} | {'×SDPA':>6} | {'peak MiB':>9}")
    rows = run(args)
    print(f"load average after the run: {load_average()}")
    if args.markdown:
        print()
        print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
