"""Prefill time of token pruning vs the unpruned model, on a LLaVA-shaped model with 576 image tokens.

The model is LLaVA-1.5-shaped (CLIP 336/14 → 576 image tokens, 36 system tokens before the image, a short question
after it) but narrow (random weights; width/depth via flags) so it runs on a CPU. Every row is measured in the same
run and reported as a ratio to the unpruned prefill (median of ``--reps`` forwards after one warm-up, the rows interleaved).

    python benchmarks/pruning.py            # FastV R=50% at K=2, plus mask path, visual-token exit
"""

from __future__ import annotations

import argparse
import statistics
import time

import sys as _sys
from pathlib import Path as _Path

# measure this checkout's attnkit, not whichever one is installed in the environment
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import torch

from attnkit.hooks.compat import model_from_config


def llava_576(hidden: int, layers: int, heads: int):
    import transformers

    text = dict(model_type="llama", vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 11008 // 4096,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, image_size=336, patch_size=14, projection_dim=64)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_id=1000,
                                      vision_feature_layer=-1)
    torch.manual_seed(0)
    return model_from_config(transformers.LlavaForConditionalGeneration, config, attn_implementation="sdpa").eval()


def inputs_576(model, batch: int, sys_len: int = 36, question: int = 24):
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(3, 900, (batch, sys_len), generator=g),
                     torch.full((batch, 576), model.config.image_token_id),
                     torch.randint(3, 900, (batch, question), generator=g)], dim=1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(batch, 3, 336, 336, generator=g))


def time_once(model, inputs, recipe) -> tuple[float, int]:
    """One prefill with ``recipe`` attached (None: the stock model). Returns (seconds, output length)."""
    import attnkit

    handle = attnkit.attach(model, recipe) if recipe is not None else None
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(**inputs)
            seconds = time.perf_counter() - t0
    finally:
        if handle is not None:
            handle.remove()
    return seconds, out.logits.shape[1]


def time_rows(model, inputs, rows, reps: int) -> list[tuple[str, float, int]]:
    """Median prefill time per row; rows are interleaved (round-robin) so machine load drifts hit all alike."""
    times = {name: [] for name, _ in rows}
    lengths = {}
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for name, recipe in rows:
            seconds, lengths[name] = time_once(model, inputs, recipe)
            if rep:
                times[name].append(seconds)
    return [(name, statistics.median(times[name]), lengths[name]) for name, _ in rows]


def main(argv=None) -> None:
    from attnkit.interventions.pruning.fastv import FastV
    from attnkit.interventions.pruning.visual_exit import VisualExit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=32)  # LLaVA-1.5-7B depth
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = llava_576(args.hidden, args.layers, args.heads)
    inputs = inputs_576(model, args.batch)
    rows = [
        ("unpruned (stock sdpa)", None),
        ("attnkit no-op recipe", []),
        ("FastV R=50% K=2 drop (last row)", [FastV(k=2, ratio=0.5)]),
        ("FastV R=50% K=2 drop (all rows)", [FastV(k=2, ratio=0.5, rule="all")]),
        ("FastV R=75% K=2 drop", [FastV(k=2, ratio=0.75)]),
        ("FastV R=50% K=2 mask path", [FastV(k=2, ratio=0.5, mode="mask")]),
        ("visual-token exit K=2", [VisualExit(k=2)]),
    ]
    results = time_rows(model, inputs, rows, args.reps)
    base = results[0][1]
    n = inputs["input_ids"].shape[1]
    print(f"LLaVA-shaped prefill: batch {args.batch}, {n} tokens (576 image), text {args.layers} layers × "
          f"{args.hidden} wide, {args.heads} heads, {torch.get_num_threads()} threads, median of {args.reps} interleaved")
    print(f"{'recipe':34s} {'tokens out':>10s} {'ms':>9s} {'× unpruned':>11s}")
    for name, seconds, tokens in results:
        print(f"{name:34s} {tokens:10d} {seconds * 1e3:9.1f} {seconds / base:11.2f}")


if __name__ == "__main__":
    main()
