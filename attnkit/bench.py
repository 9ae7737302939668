"""``attnkit bench``: which attention backend ``auto`` picks for each layer of a recipe, and why.

    attnkit bench --recipe act-llama --model smollm2          # per layer: needs, chosen backend, every verdict
    attnkit bench --recipe pasta.yaml --model tiny-llama --device cpu
    attnkit bench --costs                                       # the measured cost table auto reads

The recipe is attached (planned exactly as :func:`attnkit.attach` plans it), nothing is run, and the handle is
removed. For every planned layer it prints what the layer's interventions need, the backend ``auto`` chose, and each
backend's verdict from :func:`attnkit.kernels.backends.explain` (cannot run / unavailable / never automatic here /
its measured cost). The timings behind the costs come from ``python benchmarks/attention.py --costs`` (CPU) and
``python benchmarks/gpu.py`` (CUDA).

Example:
    >>> from attnkit.testing import tiny_causal_lm
    >>> from attnkit.interventions.noop import Noop
    >>> rows = explain_recipe(tiny_causal_lm("llama"), [Noop(layers=[0], hooks=("edit_output",))])
    >>> rows[0]["layer"], rows[0]["chosen"], rows[0]["why"]
    (0, 'torch', 'cheapest measured (~1.02× SDPA)')
"""

from __future__ import annotations

import argparse
import sys


def layer_needs(site) -> dict[str, list[str]]:
    """Capability → intervention names for one planned site, as the planner computes them (plus soft-capping)."""
    needs: dict[str, list[str]] = {}
    for entry in site.entries:
        for cap in sorted(entry.intervention.capabilities()):
            needs.setdefault(cap, []).append(entry.intervention.name)
    if getattr(getattr(site.module, "config", None), "attn_logit_softcapping", None) is not None:
        needs.setdefault("softcap", []).append("the model (attention logit softcapping)")
    return needs


def explain_recipe(model, recipe, device=None, backend: str = "auto") -> list[dict]:
    """One row per planned layer: ``layer``, ``component``, ``interventions``, ``needs``, ``chosen``, ``why`` and
    ``verdicts`` (every backend's, see :func:`attnkit.kernels.backends.explain`). Attaches and removes ``recipe``.
    With ``device`` (e.g. "cuda" for a model still on the CPU), ``chosen`` is what ``auto`` picks on that device."""
    import torch

    import attnkit
    from attnkit.kernels.backends import explain

    with attnkit.attach(model, recipe, backend=backend) as handle:
        rows = []
        for site in handle.sites():
            if not site.entries:
                continue
            dev = device or next(site.module.parameters(), torch.empty(0)).device
            needs = layer_needs(site)
            verdicts = explain(needs, dev)
            chosen = site.backend.name  # as planned on the model's device; for another device: auto's pick there
            if device is not None and backend == "auto":
                chosen = next((v["backend"] for v in verdicts if v["chosen"]), chosen)
            why = next((v["reason"] for v in verdicts if v["backend"] == chosen), "")
            if backend != "auto":
                why = f"requested backend={backend!r}"
            rows.append(dict(layer=site.layer, component=site.component,
                             interventions=[e.intervention.name for e in site.entries], needs=sorted(needs),
                             chosen=chosen, why=why, verdicts=verdicts))
    return rows


def format_rows(rows: list[dict], verbose: bool = True) -> str:
    """The rows as a text table; with ``verbose`` every other backend's verdict under its layer."""
    lines = [f"{'layer':>5}  {'component':<9}  {'interventions':<24}  {'chosen':<7}  why", "-" * 100]
    for r in rows:
        lines.append(f"{r['layer']:>5}  {r['component']:<9}  {', '.join(r['interventions']):<24}  {r['chosen']:<7}  "
                     f"{r['why']}   (needs: {', '.join(r['needs'])})")
        if verbose:
            for v in r["verdicts"]:
                if v["backend"] != r["chosen"]:
                    lines.append(f"{'':>5}  {'':<9}  {'':<24}  {v['backend']:<7}  {v['reason']}")
    return "\n".join(lines)


def costs_text() -> str:
    """The cost table ``auto`` reads, one line per device type and backend."""
    from attnkit.kernels.backends import BACKEND_NAMES, COSTS

    where = {"cpu": "B=1, H=8, D=64, fp32, N=2048, one thread; python benchmarks/attention.py --costs",
             "cuda": "NVIDIA H200, B=1, H=32, D=128, fp16, N=8192; python benchmarks/gpu.py"}
    lines = ["time / stock SDPA per edit class (a device type without a table: the static order "
             f"{', '.join(BACKEND_NAMES)})"]
    for device, table in COSTS.items():
        lines.append(f"  {device} ({where.get(device, 'measured')})")
        for backend, costs in table.items():
            lines.append(f"    {backend:<7} " + ", ".join(f"{k} {v:g}" for k, v in costs.items()))
    return "\n".join(lines)


def _load(model: str, device: str | None):
    from attnkit import models

    if model.startswith("tiny-"):
        from attnkit.testing import tiny_causal_lm

        return tiny_causal_lm(model[len("tiny-"):])
    if model == "gemma3":
        return models.load_gemma3()[0]
    return models.load_model(model, device=device)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attnkit bench", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="preset name or recipe .yaml")
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3, tiny-<family>, a folder or a hub name")
    parser.add_argument("--device", default=None, help="device whose costs and capabilities count (default: the "
                                                       "model's)")
    parser.add_argument("--backend", default="auto", help="explain an explicit choice instead of auto")
    parser.add_argument("--costs", action="store_true", help="print the cost table auto reads")
    parser.add_argument("--brief", action="store_true", help="one line per layer")
    args = parser.parse_args(argv)
    if args.costs or not args.recipe:
        print(costs_text())
        if not args.recipe:
            return 0
    from attnkit.api import AttachError
    from attnkit.models import ModelLoadError
    from attnkit.recipes import RecipeError

    try:
        model = _load(args.model, args.device)
        if args.device:
            model = model.to(args.device)
        rows = explain_recipe(model, args.recipe, device=args.device, backend=args.backend)
    except (AttachError, ModelLoadError, RecipeError, KeyError, FileNotFoundError, ValueError) as err:
        print(f"attnkit bench: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"recipe {args.recipe} on {args.model}: backend per planned layer ({len(rows)} layers)")
    print(format_rows(rows, verbose=not args.brief))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
