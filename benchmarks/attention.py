"""Attention-kernel benchmark: attnkit backends vs stock SDPA and vs the eager (materialised) reference.

For each sequence length N and edit type (none, pre-softmax group bias, sink + window, VAR-like group
reweighting, key-mass statistics pass) and each backend (eager, torch, flex; triton when a GPU is present) it
prints the best-of-r time, the ratio to stock causal SDPA (plain attention, no edit; SDPA is re-timed alternately
with every cell), the speed-up over eager (both times normalised by their concurrent SDPA time) and the peak
memory, all measured in this one run. A backend that cannot run an edit on this device gets a row saying why.

Time: with ``--threads 1`` on CPU the process CPU time by default (``--clock cpu``: other jobs' time on the core is
left out, see benchmarks/_common.py), else wall time (CUDA: synchronised). Compiled backends (flex) are called once
before timing; that first call's time (the compilation) is reported in the row's note.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU the peak of torch's CPU
allocator above the level before the call, from the profiler's allocation and free events (one extra call with
``profile_memory=True``; ``benchmarks/_common.py``). The earlier sampled-RSS measure (``_PeakRSS``, kept for
reproduce.py) missed allocations served from memory freed before. tracemalloc does not see torch allocations.

Eager baselines do what the peers do: materialise the ``[B,H,N,N]`` probabilities once, edit them, multiply by V.

Usage:
    python benchmarks/attention.py --threads 1 --markdown   # N = 512, 2048, 8192 (eager up to --eager-max-n)
    python benchmarks/attention.py --quick                  # N = 512, 2048, best of 2, no flex
    python benchmarks/attention.py --costs                  # also print the cost table auto uses (kernels/backends.py)
    python benchmarks/attention.py --explain act-llama      # which backend auto picks per layer of a recipe, and why
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import sys as _sys
from pathlib import Path as _Path

# measure this checkout's attnkit, not whichever one is installed in the environment
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from attnkit.kernels import grouped, stats

NEG = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------
def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class _PeakRSS:
    """Context manager sampling RSS in a thread; ``.peak`` = max growth in bytes over the entry level."""

    def __enter__(self):
        self.base = _rss()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self.base)
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.peak = max(self.peak, _rss() - self.base)
        self._stop.set()
        self._t.join()


TIMER = time.perf_counter  # set from --clock in main(): process CPU time by default with --threads 1


def _time(fn, cuda: bool) -> float:
    t0 = TIMER()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return TIMER() - t0


def measure(fn, ref, repeats: int, device: torch.device) -> tuple[float, float, float]:
    """(best-of-``repeats`` seconds of ``fn``, of ``ref`` timed alternately with it, peak extra bytes of ``fn``).

    Minima, not medians: on a shared machine other processes only ever add time. ``ref`` (stock SDPA) is timed
    in the same window so that the ratio ``fn / ref`` holds even when the machine's load drifts between cells.
    """
    cuda = device.type == "cuda"
    fn()
    ref()
    if cuda:
        torch.cuda.synchronize()
    t_fn, t_ref = [], []
    for _ in range(repeats):
        t_ref.append(_time(ref, cuda))
        t_fn.append(_time(fn, cuda))
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        from _common import peak_allocated

        peak = peak_allocated(fn)
    return min(t_fn), min(t_ref), peak


# ----------------------------------------------------------------------------------------------------------
# workload: LLaVA-like layout [BOS sink | system text | image block with a few visual sinks | text]
# ----------------------------------------------------------------------------------------------------------
def make_inputs(N: int, B: int, H: int, D: int, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    key_group = torch.zeros(B, N, dtype=torch.long)  # 0 text
    img0, img1 = N // 8, N // 8 + N // 2
    key_group[:, img0:img1] = 2  # image block
    key_group[:, 0] = 1  # BOS sink
    key_group[:, torch.linspace(img0 + 3, img1 - 3, 4).long()] = 1  # visual sinks inside the image
    bias = torch.tensor([0.0, -1.0, 0.7], device=device).view(1, 1, 3).expand(1, H, 3).contiguous()
    return dict(q=q, k=k, v=v, key_group=key_group.to(device), bias=bias, scale=D ** -0.5,
                window=max(64, N // 4), num_sinks=4)


def var_factors(M: torch.Tensor, p: float = 0.4) -> torch.Tensor:
    """VAR-like factors from group masses ``M [..., 3]``: sinks ×(1-p), freed mass to the image group."""
    budget = p * M[..., 1]
    img = torch.where(M[..., 2] > 0, 1 + budget / M[..., 2].clamp_min(1e-30), torch.ones_like(budget))
    return torch.stack([torch.ones_like(budget), torch.full_like(budget, 1 - p), img], -1)  # [...,3]


# eager (materialised) versions ------------------------------------------------------------------------------
def _eager_scores(x, bias_per_key=None, window=None, num_sinks=0):
    q, k = x["q"].float(), x["k"].float()
    N = q.shape[2]
    s = q @ k.transpose(-1, -2) * x["scale"]  # [B,H,N,N]
    i = torch.arange(N, device=q.device)
    bad = i[None, :] > i[:, None]  # [N,N]
    if window is not None:
        bad = bad | ((i[:, None] - i[None, :] >= window) & (i[None, :] >= num_sinks))
    if bias_per_key is not None:
        s = s + bias_per_key[:, :, None, :]
    return s.masked_fill_(bad, NEG)


def eager_none(x):
    return (torch.softmax(_eager_scores(x), -1) @ x["v"].float()).to(x["q"].dtype)


def eager_bias(x):
    B, H = x["q"].shape[:2]
    per_key = x["bias"].expand(B, H, 3).gather(2, x["key_group"][:, None].expand(B, H, -1))  # [B,H,N]
    return (torch.softmax(_eager_scores(x, per_key), -1) @ x["v"].float()).to(x["q"].dtype)


def eager_sink_window(x):
    p = torch.softmax(_eager_scores(x, window=x["window"], num_sinks=x["num_sinks"]), -1)
    return (p @ x["v"].float()).to(x["q"].dtype)


def eager_reweight(x):
    p = torch.softmax(_eager_scores(x), -1)  # [B,H,N,N]
    onehot = F.one_hot(x["key_group"], 3).float()  # [B,N,3]
    M = p @ onehot[:, None]  # [B,H,N,3]
    c = var_factors(M)  # [B,H,N,3]
    c_key = c @ onehot[:, None].transpose(-1, -2)  # [B,H,N,N] factor of each key
    p = p * c_key
    p = p / p.sum(-1, keepdim=True)
    return (p @ x["v"].float()).to(x["q"].dtype)


def eager_key_mass(x):
    return torch.softmax(_eager_scores(x), -1).sum(2)  # [B,H,N]


SOFTCAP = 20.0  # Gemma2's attention logit soft-capping value


def eager_softcap(x):
    q, k = x["q"].float(), x["k"].float()
    N = q.shape[2]
    s = torch.tanh(q @ k.transpose(-1, -2) * x["scale"] / SOFTCAP) * SOFTCAP  # [B,H,N,N]
    s = s.masked_fill_(torch.ones(N, N, dtype=torch.bool, device=q.device).triu_(1), NEG)
    return (torch.softmax(s, -1) @ x["v"].float()).to(x["q"].dtype)


# attnkit versions -------------------------------------------------------------------------------------------
def kit(backend: str):
    def none(x):
        return grouped.biased_attention(x["q"], x["k"], x["v"], scale=x["scale"], backend=backend)

    def bias(x):
        return grouped.biased_attention(x["q"], x["k"], x["v"], x["key_group"], x["bias"], scale=x["scale"],
                                        backend=backend)

    def sink_window(x):
        return grouped.biased_attention(x["q"], x["k"], x["v"], scale=x["scale"], window=x["window"],
                                        num_sinks=x["num_sinks"], backend=backend)

    def reweight(x):
        out_g, lse_g = grouped.group_partials(x["q"], x["k"], x["v"], x["key_group"], 3, scale=x["scale"],
                                              backend=backend, materialise=False)  # as the runtime calls it
        mass = grouped.group_mass(lse_g)
        return grouped.combine_groups(out_g, lse_g, var_factors(mass), mass=mass, dtype=x["q"].dtype)

    def key_mass(x):
        return stats.key_mass(x["q"], x["k"], scale=x["scale"], backend=backend)

    return {"none": none, "bias": bias, "sink_window": sink_window, "reweight": reweight, "key_mass": key_mass,
            "softcap": "logit soft-capping needs the scores (eager) or a score_mod (flex)"}


def flex_kit(device: torch.device) -> dict:
    """The edits compiled FlexAttention runs here; the others map to the reason they do not."""
    from attnkit.kernels import flex
    from attnkit.kernels.masks import KeyMask

    def keys(x, **kw):
        N = x["q"].shape[2]
        return KeyMask.build(N, N, **kw)

    def none(x):
        return flex.flex_biased_attention(x["q"], x["k"], x["v"], keys(x), None, scale=x["scale"])

    def bias(x):
        B, H = x["q"].shape[:2]
        per_key = x["bias"].expand(B, H, 3).gather(2, x["key_group"][:, None].expand(B, H, -1))[:, :, None]
        return flex.flex_biased_attention(x["q"], x["k"], x["v"], keys(x), per_key, scale=x["scale"])

    def sink_window(x):
        return flex.flex_biased_attention(x["q"], x["k"], x["v"], keys(x, window=x["window"], num_sinks=x["num_sinks"]),
                                          None, scale=x["scale"])

    def reweight(x):
        out_g, lse_g = flex.flex_group_partials(x["q"], x["k"], x["v"], x["key_group"], 3, keys(x), scale=x["scale"])
        return grouped.combine_groups(out_g, lse_g, var_factors(grouped.group_mass(lse_g)), dtype=x["q"].dtype)

    def softcap(x):
        from attnkit.kernels.flex import _run, _score_mod, structured_block_mask

        N = x["q"].shape[2]
        block_mask = structured_block_mask(KeyMask.build(N, N), x["q"].shape[0], x["q"].device)
        return _run(x["q"], x["k"], x["v"], scale=x["scale"], score_mod=_score_mod(SOFTCAP, None, None, None),
                    block_mask=block_mask)

    fns = {"none": none, "bias": bias, "sink_window": sink_window, "softcap": softcap}
    if device.type == "cuda":
        fns["reweight"] = reweight
    else:
        fns["reweight"] = "compiled flex on CPU cannot return the LSE (torch 2.13): no group partials"
    fns["key_mass"] = "flex has no column statistics of its own (it runs the torch pass)"
    return fns


EAGER = {"none": eager_none, "bias": eager_bias, "sink_window": eager_sink_window, "reweight": eager_reweight,
         "key_mass": eager_key_mass, "softcap": eager_softcap}


def sdpa(x):
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True, scale=x["scale"])


# ----------------------------------------------------------------------------------------------------------
def machine(device) -> str:
    """One line naming the machine (reproduce.py's header uses it too)."""
    from _common import environment_line

    return environment_line(device)


def backends_for(args, device: torch.device) -> list[str]:
    """The backends to measure: ``--backends`` as given, triton dropped where it cannot compile (no CUDA)."""
    chosen = list(args.backends)
    if "triton" in chosen:
        from attnkit.kernels.triton import triton_available

        if device.type != "cuda" or not triton_available():
            chosen.remove("triton")
    return chosen


def functions(backend: str, device: torch.device) -> dict:
    """edit -> function, or edit -> the reason this backend does not run it here."""
    if backend == "eager":
        return EAGER
    if backend == "flex":
        from attnkit.kernels.backends import flex_unavailable

        reason = flex_unavailable(device.type)
        return flex_kit(device) if reason is None else {edit: f"unavailable: {reason}" for edit in EAGER}
    return kit(backend)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    backends = backends_for(args, device)
    rows = []
    for N in args.n:
        x = make_inputs(N, args.batch, args.heads, args.dim, dtype, device)
        reps = args.repeats if N <= 2048 else max(1, args.repeats // 2)
        t_sdpa, _, m_sdpa = measure(lambda: sdpa(x), lambda: sdpa(x), reps, device)
        rows.append(dict(N=N, edit="(stock SDPA)", backend="sdpa", ms=t_sdpa * 1e3, sdpa=1.0, eager=None,
                         mb=m_sdpa / 2**20))
        print(_fmt(rows[-1]), flush=True)
        for edit in args.edits:
            eager_rel = None  # eager time / its concurrent SDPA time
            for backend in backends:
                if backend == "eager" and N > args.eager_max_n:
                    nn_gb = args.batch * args.heads * N * N * 4 / 2**30
                    rows.append(dict(N=N, edit=edit, backend="eager", ms=None, sdpa=None, eager=None, mb=None,
                                     note=f"skipped: N > --eager-max-n ({nn_gb:.1f} GiB per N² tensor)"))
                    continue
                fn = functions(backend, device)[edit]
                if isinstance(fn, str):
                    rows.append(dict(N=N, edit=edit, backend=backend, ms=None, sdpa=None, eager=None, mb=None,
                                     note=fn))
                    print(_fmt(rows[-1]), flush=True)
                    continue
                note = ""
                if backend == "flex":  # the first call compiles: time it apart
                    start = time.perf_counter()
                    fn(x)
                    note = f"first call (compilation) {time.perf_counter() - start:.1f} s wall"
                t, t_ref, m = measure(lambda: fn(x), lambda: sdpa(x), reps, device)
                rel = t / t_ref
                if backend == "eager":
                    eager_rel = rel
                rows.append(dict(N=N, edit=edit, backend=backend, ms=t * 1e3, sdpa=rel,
                                 eager=(eager_rel / rel) if eager_rel else None, mb=m / 2**20, note=note))
                print(_fmt(rows[-1]), flush=True)
        del x
    return rows


def cost_table(rows: list[dict], device_type: str, n: int) -> str:
    """The ``COSTS[device_type]`` entry of attnkit/kernels/backends.py from the rows at sequence length ``n``."""
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["N"] == n and r["sdpa"] is not None and r["backend"] != "sdpa":
            table.setdefault(r["backend"], {})[r["edit"]] = round(r["sdpa"], 2)
    lines = [f'    "{device_type}": {{  # N={n}, measured by benchmarks/attention.py --costs']
    for backend, costs in table.items():
        lines.append(f'        "{backend}": {costs!r},'.replace("'", '"'))
    lines.append("    },")
    return "\n".join(lines)


def _fmt(r: dict) -> str:
    def f(v, spec):
        return "—" if v is None else format(v, spec)

    note = r.get("note", "")
    return (f"{r['N']:>6} | {r['edit']:<12} | {r['backend']:<6} | {f(r['ms'], '9.1f')} | {f(r['sdpa'], '6.2f')} | "
            f"{f(r['eager'], '7.2f')} | {f(r['mb'], '8.1f')} {note}")


def header() -> str:
    return (f"{'N':>6} | {'edit':<12} | {'backend':<6} | {'ms':>9} | {'×SDPA':>6} | {'eager/x':>7} | {'peak MiB':>8}\n"
            + "-" * 72)


def markdown(rows: list[dict]) -> str:
    out = ["| N | edit | backend | ms | time / SDPA | speed-up vs eager | peak MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(v, spec):
            return "—" if v is None else format(v, spec)

        out.append(f"| {r['N']} | {r['edit']} | {r['backend']} | {f(r['ms'], '.1f')} | {f(r['sdpa'], '.2f')} | "
                   f"{f(r['eager'], '.2f')} | {f(r['mb'], '.1f')}{' (' + r['note'] + ')' if r.get('note') else ''} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--edits", nargs="+", default=list(EAGER), choices=list(EAGER))
    ap.add_argument("--backends", nargs="+", default=["eager", "torch", "flex", "triton"],
                    choices=["eager", "torch", "flex", "triton"], help="triton runs only where CUDA is present")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per cell (best of); halved at N > 2048")
    ap.add_argument("--eager-max-n", type=int, default=2048,
                    help="largest N for the materialised eager baseline (memory: B·H·N²·4 bytes per tensor)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice); 1 gives steadier ratios on a shared machine")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="cpu = process CPU time (default on CPU with --threads 1), wall = elapsed time")
    ap.add_argument("--quick", action="store_true", help="N = 512 and 2048, best of 2, without flex")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    ap.add_argument("--costs", action="store_true", help="also print the cost table auto uses (N = 2048 rows)")
    ap.add_argument("--explain", metavar="RECIPE", default=None,
                    help="only explain which backend auto picks per layer of RECIPE (a preset name or YAML file) "
                         "on --model, and why; measures nothing")
    ap.add_argument("--model", default="smollm2", help="for --explain: smollm2, gemma3, or tiny-<family>")
    args = ap.parse_args(argv)
    if args.explain:
        from attnkit.bench import main as bench_main

        return bench_main(["--recipe", args.explain, "--model", args.model, "--device", args.device])
    if args.quick:
        args.n, args.repeats = [512, 2048], 2
        args.backends = [b for b in args.backends if b != "flex"]
    from _common import checkout, clock, default_clock, environment_line

    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    global TIMER
    args.clock = args.clock or default_clock(dev)
    TIMER = clock(args.clock) if dev.type == "cpu" else time.perf_counter
    print(f"machine: {environment_line(dev)}")
    print(checkout())
    print(f"shape: B={args.batch} H={args.heads} D={args.dim} {args.dtype}, causal; groups: BOS sink + 4 visual sinks "
          f"inside an N/2 image block; window N/4 with 4 sinks; time: {args.clock if dev.type == 'cpu' else 'wall'}, "
          f"best of {args.repeats}; peak memory: "
          f"{'cuda max_memory_allocated' if dev.type == 'cuda' else 'peak of the CPU allocator (profiler)'}")
    print(header())
    rows = run(args)
    from _common import load_average

    print(f"load average after the run: {load_average()}")
    if args.markdown:
        print()
        print(markdown(rows))
    if args.costs:
        n = 2048 if 2048 in args.n else max(args.n)
        print()
        print(cost_table(rows, dev.type, n))
    return rows


if __name__ == "__main__":
    main()
