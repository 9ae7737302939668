"""Cost of attaching attnkit to `generate` on the real SmolLM2-135M-Instruct (CPU).

Arms, timed alternately in one run (best of --repeats each):
  stock      the model as loaded (SDPA);
  identity   attach with a no-op recipe (every layer routed through attnkit's dispatcher, fused SDPA path);
  reweight   attach with an ACT-like first-token reweighting on every layer (exact group partials, torch backend).
Prints a table of time ratios against stock. Issue target: identity adds ≤ 5 % to generate time
(512-token prompt, 64 new tokens).

    python benchmarks/generate.py [--prompt-tokens 512] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

import attnkit
from attnkit.interventions.noop import Noop
from attnkit.models import load_smollm2


class DampFirst(attnkit.Intervention):
    """ACT-like reweighting: attention on the first token × beta, mass returned to the rest in proportion."""

    name = "bench-damp-first"

    def key_groups(self):
        return ("first",)

    def group_factors(self, mass, ctx):  # [B,H,Q,2] -> [B,H,Q,2]
        rest, sink = mass[..., :1], mass[..., 1:]
        return torch.cat([(rest + 0.6 * sink) / rest.clamp_min(1e-12), torch.full_like(sink, 0.4)], dim=-1)


def prompt_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    from attnkit.data import data_path

    text = data_path("wikitext-2", "test.txt", must_exist=True).read_text()[:20000]
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :n_tokens]
    assert ids.shape[1] == n_tokens, "not enough text for the requested prompt length"
    return ids


def time_generate(model, ids, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    arms = {
        "stock": lambda: contextlib.nullcontext(),
        "identity": lambda: attnkit.attach(model, [Noop()]),
        "reweight": lambda: attnkit.attach(model, [DampFirst()]),
    }
    time_generate(model, ids, 4)  # warm-up
    best = {name: float("inf") for name in arms}
    for _ in range(args.repeats):  # alternate arms so drifting machine load hits them alike
        for name, make in arms.items():
            with make():
                best[name] = min(best[name], time_generate(model, ids, args.new_tokens))
    print(f"\nSmolLM2-135M-Instruct generate: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"| arm | seconds | × stock |\n|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} | {seconds / best['stock']:.3f} |")


if __name__ == "__main__":
    main()
