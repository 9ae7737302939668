"""Cost of attaching attnkit to `generate` on the real SmolLM2-135M-Instruct (CPU).

Arms, timed alternately in rounds (--repeats); two ratios against stock: best / best, and the median over rounds
of each round's arm / stock time (robust to load that drifts during the run):
  stock        the model as loaded (SDPA);
  identity     ``noop`` (edit_output): every layer routed through attnkit's dispatcher, fused SDPA path;
  temperature  ``head-temperature`` with log-length scaling (per-row query_scale, fused SDPA);
  pasta        ``pasta`` α = 0.01 on every head (a per-key score_bias: one fused call with a column mask);
  reweight     an ACT-like first-token reweighting on every layer (group_factors: exact group partials);
  act          ``act`` β = 0.4 on every layer (key_stats at the prefill + group_factors on every step).
Prints a table of time ratios against stock. Issue #17 targets: identity ≤ 1.02× stock, every fused
intervention ≤ 1.10× stock (512-token prompt, 64 new tokens).

    python benchmarks/generate.py --threads 1 [--prompt-tokens 512] [--new-tokens 64] [--repeats 3] [--arms ...]
    python benchmarks/generate.py --device cuda --dtype bf16 --random-weights   # a GPU machine without the weights

``--random-weights``: SmolLM2-135M's shape (30 layers, 9 query / 3 K/V heads of 64) with random weights and random
token ids: the same work per token, no weights needed (detected sinks, hence ACT's groups, differ from the real
model's).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import sys as _sys
from pathlib import Path as _Path

# measure this checkout's attnkit, not whichever one is installed in the environment
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

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


def random_smollm2(device, dtype):
    """SmolLM2-135M's architecture with random weights (seeded) on ``device`` in ``dtype``."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                      rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def time_generate(model, ids, new_tokens: int, timer=time.perf_counter) -> float:
    start = timer()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    if out.is_cuda:
        torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return timer() - start


def _attach(recipe, emphasis=None):
    def make(model):
        handle = attnkit.attach(model, recipe())
        if emphasis is not None:
            handle.set_span("emphasis", [[emphasis]])
        return handle
    return make


def arms(prompt_tokens: int) -> dict:
    """name -> (what it exercises, a function model -> context manager)."""
    from attnkit.api import get_intervention

    span = (prompt_tokens // 4, prompt_tokens // 4 + min(32, prompt_tokens // 2))  # PASTA: up to 32 prompt tokens
    return {
        "stock": ("the model as loaded (SDPA)", lambda model: contextlib.nullcontext()),
        "identity": ("noop: dispatcher + fused SDPA", _attach(lambda: [Noop()])),
        "temperature": ("head-temperature, log-length (query_scale per row)",
                        _attach(lambda: [get_intervention("head-temperature")(temperature=0.8, log_length_base=4)])),
        "pasta": ("pasta α=0.01 (score_bias per key)",
                  _attach(lambda: [get_intervention("pasta")(alpha=0.01)], emphasis=span)),
        "reweight": ("first-token ×0.4 (group_factors)", _attach(lambda: [DampFirst()])),
        "act": ("act β=0.4 (key_stats + group_factors)", _attach(lambda: [get_intervention("act")(beta=0.4)])),
    }


def ratios(arm: list[float], stock: list[float]) -> tuple[float, float]:
    """``(best / best, median over rounds of arm / stock)``: the second pairs each round's arm with the stock run
    taken next to it, so load that drifts between rounds cancels.

    Example:
        >>> [round(r, 3) for r in ratios([2.2, 2.0, 3.3], [2.0, 1.9, 3.0])]
        [1.053, 1.1]
    """
    paired = sorted(a / b for a, b in zip(arm, stock))
    return min(arm) / min(stock), paired[len(paired) // 2]


def main(argv=None) -> list[dict]:
    from _common import checkout, environment_line, load_average

    all_arms = arms(512)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--arms", nargs="+", default=list(all_arms), choices=list(all_arms))
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="cpu = process CPU time (default with --threads 1), wall = elapsed time")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (wall time on cuda)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--random-weights", action="store_true",
                        help="SmolLM2's shape with random weights and random token ids (no weights needed)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from _common import clock, default_clock

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    args.clock = args.clock or ("wall" if device.type == "cuda" else default_clock())
    timer = clock(args.clock)
    if args.random_weights:
        model = random_smollm2(device, dtype)
        ids = torch.randint(3, 49152, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    else:
        model, tokenizer = load_smollm2(dtype=dtype)
        model = model.to(device)
        ids = prompt_ids(tokenizer, args.prompt_tokens)
    ids = ids.to(device)
    chosen = {name: arm for name, arm in arms(args.prompt_tokens).items() if name in args.arms or name == "stock"}
    print(environment_line(device) if device.type == "cuda" else environment_line())
    print(checkout())
    load_before = load_average()
    time_generate(model, ids, 4)  # warm-up
    times = {name: [] for name in chosen}
    for _ in range(args.repeats):  # alternate arms so drifting machine load hits them alike
        for name, (_, make) in chosen.items():
            with make(model):
                time_generate(model, ids, 2)  # the arm's own warm-up (first calls, caches)
                times[name].append(time_generate(model, ids, args.new_tokens, timer))
    what = "SmolLM2-135M-shaped, random weights" if args.random_weights else "SmolLM2-135M-Instruct"
    print(f"\n{what} generate ({args.device}, {args.dtype}): {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, {args.clock} time, {args.repeats} rounds, arms alternated; "
          f"load average {load_before} before, {load_average()} after")
    print(f"| arm | what runs | best {args.clock} seconds | × stock (best / best) | × stock (median of rounds) |\n"
          "|---|---|---|---|---|")
    rows = []
    for name, seconds in times.items():
        best, paired = ratios(seconds, times["stock"])
        rows.append(dict(arm=name, seconds=min(seconds), ratio=best, paired=paired))
        print(f"| {name} | {chosen[name][0]} | {min(seconds):.2f} | {best:.3f} | {paired:.3f} |")
    return rows


if __name__ == "__main__":
    main()
