"""Which launch configuration of attnkit's Triton kernels is fastest on this card (issue #17's GPU goals).

The first GPU run measured the kernels at one configuration (64 × 64 blocks, Triton's default warps and stages):
2.2–4.3× SDPA at N = 8192 on an H200. This sweep times the three kernels — plain causal attention
(``biased_attention`` without a bias), the per-group partials of group reweighting (``group_partials``, three
groups) and the key-mass pass (``key_mass``) — at each configuration against stock SDPA in the same run, checks each
configuration's output against the default one's, and prints a table sorted by the partials' time plus the best
configuration per kernel, so that the defaults can be set from a measurement.

    python benchmarks/triton_sweep.py                                   # N = 8192, fp16, H = 32, D = 128
    python benchmarks/triton_sweep.py --n 4096 --configs 64x64 128x64w8s3
    TRITON_INTERPRET=1 python benchmarks/triton_sweep.py --allow-cpu --n 64 --heads 2 --dim 16 --configs 16x16 32x16

A configuration is ``MxN`` (block_m × block_n) with optional ``wW`` (num_warps) and ``sS`` (num_stages), e.g.
``128x64w8s3``. One that does not compile on the card (e.g. more shared memory than it has) is reported with the
reason, not fatal. Tolerance against the default configuration: 2e-3 relative in fp16, 2e-2 in bf16, 1e-5 in fp32.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout's attnkit
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import attention as A  # noqa: E402
from _common import checkout, environment_line, gpu_or_refusal  # noqa: E402
from gpu import DTYPES, TOLERANCE, rel_err  # noqa: E402

DEFAULT = "64x64"
CONFIGS = ["64x64", "64x64w4s3", "64x64w8s3", "128x64w4s3", "128x64w8s3", "128x64w8s4", "128x128w8s3",
           "64x128w4s3", "128x32w4s4", "64x32w4s4"]
KERNELS = ("plain", "partials", "key_mass")
_CONFIG = re.compile(r"^(\d+)x(\d+)(?:w(\d+))?(?:s(\d+))?$")


def parse_config(text: str) -> dict:
    """``"128x64w8s3"`` → the launch keyword arguments of the kernels.

    Example:
        >>> parse_config("128x64w8s3")
        {'block_m': 128, 'block_n': 64, 'num_warps': 8, 'num_stages': 3}
        >>> parse_config("64x32")
        {'block_m': 64, 'block_n': 32, 'num_warps': None, 'num_stages': None}
    """
    match = _CONFIG.match(text)
    if match is None:
        raise ValueError(f"--configs: {text!r} is not MxN[wW][sS] (e.g. 128x64w8s3)")
    m, n, w, s = match.groups()
    return dict(block_m=int(m), block_n=int(n), num_warps=None if w is None else int(w),
                num_stages=None if s is None else int(s))


def kernel_calls(x: dict, launch: dict) -> dict:
    """name -> a function running that kernel on inputs ``x`` (attention.make_inputs) with ``launch``."""
    from attnkit.kernels import triton as tk

    q, k, v, groups, scale = x["q"], x["k"], x["v"], x["key_group"], x["scale"]
    return {"plain": lambda: tk.biased_attention(q, k, v, groups, None, scale=scale, **launch),
            "partials": lambda: tk.group_partials(q, k, v, groups, 3, scale=scale, **launch),
            "key_mass": lambda: tk.key_mass(q, k, scale=scale, **launch)}


def _max_err(got, want) -> float:
    if isinstance(want, tuple):
        return max(rel_err(g, w) for g, w in zip(got, want))
    return rel_err(got, want)


def sweep(configs: list[str], x: dict, device, repeats: int, tolerance: float) -> list[dict]:
    """One row per configuration: ``config``, per kernel ``time / SDPA`` (None where it failed), ``err`` (max
    relative error against the default configuration) and ``note`` (why it failed, or a tolerance breach)."""
    sdpa = lambda: A.sdpa(x)  # noqa: E731
    reference = {name: fn() for name, fn in kernel_calls(x, parse_config(DEFAULT)).items()}
    rows = []
    for config in configs:
        row = dict(config=config, err=0.0, note="")
        for name, fn in kernel_calls(x, parse_config(config)).items():
            try:
                out = fn()  # first call: compiles
                t_fn, t_ref, _ = A.measure(fn, sdpa, repeats, device)
            except Exception as err:  # noqa: BLE001  (a configuration the card cannot run: reported, not fatal)
                row[name] = None
                row["note"] = row["note"] or f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
                continue
            row[name] = t_fn / t_ref
            row["err"] = max(row["err"], _max_err(out, reference[name]))
        if row["err"] > tolerance:
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"differs from {DEFAULT} beyond tolerance"
        rows.append(row)
        print(f"{config:<14} " + "  ".join(f"{k} {_cell(row[k])}" for k in KERNELS) + f"  err {row['err']:.1e} "
              f"{row['note']}", flush=True)
    return rows


def _cell(value) -> str:
    return "failed" if value is None else f"{value:.2f}"


def best_per_kernel(rows: list[dict]) -> dict:
    """kernel -> the row with the lowest time / SDPA among configurations that ran and match the default."""
    ok = [r for r in rows if "beyond tolerance" not in r["note"]]
    out = {}
    for name in KERNELS:
        ran = [r for r in ok if r.get(name) is not None]
        if ran:
            out[name] = min(ran, key=lambda r: r[name])
    return out


def markdown(rows: list[dict], best: dict) -> str:
    order = sorted(rows, key=lambda r: (r["partials"] is None, r["partials"] or 0.0))
    lines = ["| config (block_m×block_n, warps, stages) | plain × SDPA | group partials × SDPA | key mass × SDPA | "
             f"max rel. err vs {DEFAULT} | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {_cell(r['plain'])} | {_cell(r['partials'])} | {_cell(r['key_mass'])} | "
              f"{r['err']:.1e} | {r['note']} |" for r in order]
    lines += ["", "Best per kernel: " + ", ".join(f"{name} {row['config']} ({row[name]:.2f}× SDPA)"
                                                  for name, row in best.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    ap.add_argument("--configs", nargs="+", default=CONFIGS, help="MxN[wW][sS], e.g. 128x64w8s3")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU (Triton interpreter): a smoke test only")
    args = ap.parse_args(argv)
    try:
        for config in args.configs:
            parse_config(config)
    except ValueError as err:
        ap.error(str(err))
    device = gpu_or_refusal("triton_sweep.py", args.allow_cpu)
    if device is None:
        return 2
    A.TIMER = time.perf_counter
    x = A.make_inputs(args.n, 1, args.heads, args.dim, DTYPES[args.dtype], device)
    print(environment_line(device))
    print(checkout())
    rows = sweep(args.configs, x, device, args.repeats, TOLERANCE[args.dtype])
    text = (f"Triton launch sweep: N = {args.n}, {args.dtype}, B=1, H={args.heads}, D={args.dim}, causal, "
            f"best of {args.repeats} (wall time, synchronised)\n\n" + markdown(rows, best_per_kernel(rows)) + "\n")
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
