"""Attention-kernel benchmark: attnkit backends vs stock SDPA and vs the eager (materialised) reference.

For each sequence length N and edit type (none, pre-softmax group bias, sink + window, VAR-like group
reweighting, key-mass statistics pass) and each backend (eager, torch, triton when a GPU is present) it prints
the best-of-r time, the ratio to stock causal SDPA (plain attention, no edit; SDPA is re-timed alternately
with every cell), the speed-up over eager (both times normalised by their concurrent SDPA time) and the peak
memory, all measured in this one run.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU the peak resident-set growth
(RSS) above the level before the call, sampled every ~0.5 ms by a background thread (torch ops release the GIL;
large CPU tensors are mmap-allocated and returned to the OS on free, so RSS tracks them). tracemalloc does not
see torch allocations.

Eager baselines do what the peers do: materialise the ``[B,H,N,N]`` probabilities once, edit them, multiply by V.

Usage:
    python benchmarks/attention.py            # N = 512, 2048, 8192 (eager up to --eager-max-n)
    python benchmarks/attention.py --quick    # N = 512, 2048, best of 2
    python benchmarks/attention.py --markdown # also print the table as markdown
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time

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


def _time(fn, cuda: bool) -> float:
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


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
        with _PeakRSS() as p:
            fn()
        peak = p.peak
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
                                              backend=backend)
        c = var_factors(grouped.group_mass(lse_g))
        return grouped.combine_groups(out_g, lse_g, c, dtype=x["q"].dtype)

    def key_mass(x):
        return stats.key_mass(x["q"], x["k"], scale=x["scale"], backend=backend)

    return {"none": none, "bias": bias, "sink_window": sink_window, "reweight": reweight, "key_mass": key_mass}


EAGER = {"none": eager_none, "bias": eager_bias, "sink_window": eager_sink_window, "reweight": eager_reweight,
         "key_mass": eager_key_mass}


def sdpa(x):
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True, scale=x["scale"])


# ----------------------------------------------------------------------------------------------------------
def machine(device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    backends = ["eager", "torch"]
    if device.type == "cuda":
        from attnkit.kernels.triton import triton_available

        if triton_available():
            backends.append("triton")
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
                if backend == "eager":
                    if N > args.eager_max_n:
                        nn_gb = args.batch * args.heads * N * N * 4 / 2**30
                        rows.append(dict(N=N, edit=edit, backend="eager", ms=None, sdpa=None, eager=None, mb=None,
                                         note=f"skipped: N > --eager-max-n ({nn_gb:.1f} GiB per N² tensor)"))
                        continue
                    fn = EAGER[edit]
                else:
                    fn = kit(backend)[edit]
                t, t_ref, m = measure(lambda: fn(x), lambda: sdpa(x), reps, device)
                rel = t / t_ref
                if backend == "eager":
                    eager_rel = rel
                rows.append(dict(N=N, edit=edit, backend=backend, ms=t * 1e3, sdpa=rel,
                                 eager=(eager_rel / rel) if eager_rel else None, mb=m / 2**20))
                print(_fmt(rows[-1]), flush=True)
        del x
    return rows


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
    ap.add_argument("--quick", action="store_true", help="N = 512 and 2048, best of 2")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats = [512, 2048], 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(f"machine: {machine(dev)}")
    print(f"shape: B={args.batch} H={args.heads} D={args.dim} {args.dtype}, causal; groups: BOS sink + 4 visual sinks "
          f"inside an N/2 image block; window N/4 with 4 sinks; peak memory: "
          f"{'cuda max_memory_allocated' if dev.type == 'cuda' else 'sampled RSS growth'}")
    print(header())
    rows = run(args)
    if args.markdown:
        print()
        print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
