"""Every registered LLM / VLM intervention through ``attach()`` on a GPU: each fused backend (torch, triton, flex)
against the eager reference in fp32, fp16 and bf16, on tiny random Llama and LLaVA models with a left-padded batch
(every sample padded differently), plus greedy KV-cache ``generate`` under each backend.

    python benchmarks/gpu_models.py --out /tmp/gpu_models.md          # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/gpu_models.py --allow-cpu --methods pasta act --out /tmp/m.md  # smoke test

Error: max |Δlogit| over real tokens relative to the largest reference logit. In fp32 a fused backend is compared
with eager and passes at 1e-4. In fp16 / bf16 both eager and the fused backend, run in that dtype, are compared with
the fp32 eager run of the same (rounded) weights: the fused backend passes when it is no less accurate than eager,
within ``max(2 × eager's error, floor)`` (floor 5e-3 fp16, 2e-2 bf16). Greedy generation passes when every token
equals eager's (fp32 only: half-precision ties may flip). A backend that lacks a capability the method needs is
refused at attach with one sentence: that cell reads "n/a" and is not a failure.

The models are tiny and random (no real VLM weights exist where this was written): the point is the kernels and the
dispatch on a real card, not model quality. ``benchmarks/gpu.py`` times the kernels.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout's attnkit
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import checkout, environment_line, gpu_or_refusal  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}
FUSED = ("torch", "triton", "flex")
NEW_TOKENS = 6


def build(family: str, device, dtype):
    """(model, left-padded batch) of a tiny random ``family`` model on ``device`` in ``dtype``."""
    from attnkit.testing import padded_batch, tiny_causal_lm, tiny_vlm

    model = (tiny_vlm(family) if family == "llava" else tiny_causal_lm(family, head_dim=64))
    batch, _ = padded_batch(family, model, lengths=(40, 29, 13) if family != "llava" else (9, 6, 3),
                            fully_padded=False)
    model = model.to(device=device, dtype=dtype)
    batch = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
             for k, v in batch.items()}
    return model, batch


def set_spans(handle, cls, batch) -> None:
    """Every user span the method reads: the middle third of each sample's real tokens."""
    names = sorted(r[len("span:"):] for r in cls.requires if r.startswith("span:"))
    ranges = []
    for mask in batch["attention_mask"]:
        real, width = int(mask.sum()), mask.numel()
        start = width - real
        ranges.append([(start + real // 3, start + max(2 * real // 3, real // 3 + 1))])
    for name in names:
        handle.set_span(name, ranges)


def logits(model, batch, cls, backend: str):
    """(real-token logits [T, V] in fp64, backends the handle used) of ``cls``'s active setting on ``backend``."""
    import attnkit

    with attnkit.attach(model, [cls(**cls.conformance["active"])], backend=backend) as handle, torch.no_grad():
        set_spans(handle, cls, batch)
        used = sorted({m["backend"] for m in handle.report()["modules"]})
        out = model(**batch).logits  # [B, N, V]
    if out.shape[1] != batch["attention_mask"].shape[1]:  # pruned positions: compare each row's last one
        return out[:, -1].double(), used
    return out[batch["attention_mask"].bool()].double(), used


def tokens(model, batch, cls, backend: str) -> torch.Tensor:
    import attnkit

    pad = getattr(model.generation_config, "pad_token_id", None) or 0
    with attnkit.attach(model, [cls(**cls.conformance["active"])], backend=backend) as handle, torch.no_grad():
        set_spans(handle, cls, batch)
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad,
                             eos_token_id=None)
    return out[:, batch["input_ids"].shape[1]:]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def methods_for(family: str, model, wanted) -> list:
    import attnkit
    from attnkit.api import available_interventions, get_intervention
    from attnkit.hooks.transformers import TransformersAdapter

    description = TransformersAdapter(model).description
    out = []
    for name in available_interventions():
        cls = get_intervention(name)
        conf = cls.conformance
        if wanted and name not in wanted or conf.get("active") is None or description.missing(cls.requires):
            continue
        if conf.get("families") is not None and family not in conf["families"]:
            continue
        try:
            attnkit.attach(model, [cls(**conf["active"])]).remove()
        except attnkit.AttachError:
            continue
        out.append(cls)
    return out


def run(args, device) -> list[dict]:
    import attnkit

    rows = []
    start = time.perf_counter()
    for family in args.families:
        for dname in args.dtypes:
            model, batch = build(family, device, DTYPES[dname])
            if dname != "fp32":  # the reference: the same rounded weights and inputs, run in fp32 on eager
                reference = copy.deepcopy(model).float()
                ref_batch = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
            for cls in methods_for(family, model, args.methods):
                if time.perf_counter() - start > args.budget:
                    print(f"stopping: --budget {args.budget} s spent", flush=True)
                    return rows
                try:
                    eager, _ = logits(model, batch, cls, "eager")
                    if dname == "fp32":
                        truth, eager_err, want_tokens = eager, 0.0, tokens(model, batch, cls, "eager")
                    else:
                        truth, want_tokens = logits(reference, ref_batch, cls, "eager")[0], None
                        eager_err = rel(eager, truth)
                except Exception as err:  # noqa: BLE001
                    row = dict(family=family, dtype=dname, method=cls.name, backend="eager", eager_err=float("nan"),
                               tol=float("nan"), used="eager", err=None, ok=False,
                               error=f"{type(err).__name__}: {err}"[:160])
                    rows.append(row)
                    print(line(row), flush=True)
                    continue
                tol = max(2 * eager_err, FLOOR[dname])
                for backend in args.backends:
                    row = dict(family=family, dtype=dname, method=cls.name, backend=backend, eager_err=eager_err,
                               tol=tol)
                    try:
                        got, used = logits(model, batch, cls, backend)
                    except attnkit.AttachError as err:
                        row.update(used="n/a", err=None, ok=True, error=str(err)[:160])
                        rows.append(row)
                        print(line(row), flush=True)
                        continue
                    except Exception as err:  # noqa: BLE001  (recorded in the table: that is the finding)
                        row.update(used="—", err=None, ok=False, error=f"{type(err).__name__}: {err}"[:200])
                        rows.append(row)
                        print(line(row), flush=True)
                        continue
                    try:
                        row.update(used="+".join(used) or "—", err=rel(got, truth))
                        row["ok"] = row["err"] <= tol
                        if want_tokens is not None:
                            same = tokens(model, batch, cls, backend) == want_tokens
                            row["tokens"] = f"{int(same.sum())}/{same.numel()}"
                            row["ok"] = row["ok"] and bool(same.all())
                    except Exception as err:  # noqa: BLE001  (recorded in the table: that is the finding)
                        row.update(err=None, ok=False, error=f"{type(err).__name__}: {err}"[:160])
                    rows.append(row)
                    print(line(row), flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def line(r: dict) -> str:
    err = "—" if r.get("err") is None else f"{r['err']:.1e}"
    return (f"| {r['family']} | {r['dtype']} | {r['method']} | {r['backend']} | {r['used']} | {err} | "
            f"{r['eager_err']:.1e} | {r['tol']:.0e} | {r.get('tokens', '')} | {'yes' if r['ok'] else '**no**'} | "
            f"{r.get('error', '')} |")


def report(args, device, rows) -> str:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (CPU smoke test)"
    failed = [r for r in rows if not r["ok"]]
    head = ["| family | dtype | method | backend asked | backend used | rel. error | eager's error | tolerance | "
            "greedy tokens = eager | ok | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    return "\n".join([f"# Interventions through attach() on {card}", "",
                      f"- Command: `python benchmarks/gpu_models.py {' '.join(sys.argv[1:])}`".rstrip(),
                      f"- Date: {datetime.date.today().isoformat()}",
                      f"- Machine: {environment_line(device)}", f"- {checkout()}",
                      f"- {len(rows)} cells, {len(failed)} failed; error: vs eager in fp32, vs fp32 eager in "
                      "fp16/bf16 (see the module docstring)", ""] + head + [line(r) for r in rows]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["llama", "llava"])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--backends", nargs="+", default=list(FUSED), choices=list(FUSED))
    ap.add_argument("--methods", nargs="*", default=None, help="registered names (default: every LLM/VLM one)")
    ap.add_argument("--budget", type=float, default=240.0, help="stop starting new methods after this many seconds")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "GPU-models.md"))
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU (Triton interpreter): a smoke test only")
    args = ap.parse_args(argv)
    device = gpu_or_refusal("gpu_models.py", args.allow_cpu)
    if device is None:
        return 2
    rows = run(args, device)
    text = report(args, device, rows)
    Path(args.out).write_text(text)
    print(text)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
