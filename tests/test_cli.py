"""The ``attnkit`` command line: --version, presets table, user errors (exit 2, one line, before loading), --span,
--dtype/--device, diffusion recipes on a pipeline folder."""

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import attnkit
from attnkit import cli, models
from attnkit.recipes import list_presets, presets_dir

sys.path.insert(0, str(Path(__file__).parent))
from test_models import WORDS, never_load, save_tiny_lm  # noqa: E402,F401  (never_load is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, timeout=120):
    """``python -m attnkit.cli ARGS`` in a subprocess importing this checkout."""
    env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "attnkit.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("cli_tiny_lm"))


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    expected = (f"attnkit {attnkit.__version__} (torch {version('torch')}, transformers {version('transformers')}, "
                f"diffusers {version('diffusers')})")
    assert out.stdout.strip() == expected


# what each preset needs, written out by hand from the methods' papers (independent of the fallback table)
EXPECTED = {
    "act-llama": ("LLM/VLM", "-"), "act-mistral": ("LLM/VLM", "-"), "cmai": ("VLM", "-"), "damro": ("VLM", "-"), "fastv": ("VLM", "-"),
    "head-temperature": ("LLM/VLM", "-"), "kv-retention": ("LLM/VLM", "-"), "noop": ("LLM/VLM", "-"),
    "pag-sd": ("diffusion", "-"), "paint": ("VLM", "-"), "pasta": ("LLM/VLM", "emphasis"),
    "prompt-to-prompt": ("diffusion", "-"), "streaming-llm": ("LLM/VLM", "-"),
    "streaming-llm-ppl": ("LLM/VLM", "-"), "var-auto": ("VLM", "-"),
    "var-llava": ("VLM", "-"), "var-qwen2-vl": ("VLM", "-"), "vhr": ("VLM", "-"), "visual-exit": ("VLM", "-"),
    "vtc-cls": ("VLM", "-"),
    # diffusion editing (issue 15)
    "a-star": ("diffusion", "-"), "broadway": ("diffusion", "-"), "broadway-videocrafter": ("diffusion", "-"),
    "designedit": ("diffusion", "-"), "ditctrl": ("diffusion", "-"), "fatezero": ("diffusion", "-"),
    "freecustom": ("diffusion", "-"), "masactrl": ("diffusion", "-"), "styleid": ("diffusion", "-"),
    "styleid-diffusers": ("diffusion", "-"),
    # long context, position bias and cropping (issue 16)
    "agla": ("VLM", "-"), "duo-attention": ("LLM/VLM", "-"), "long-heads": ("LLM/VLM", "-"),
    "pine": ("LLM/VLM", "pine_segments"), "razor-attention": ("LLM/VLM", "-"),
    "recycled-attention": ("LLM/VLM", "-"), "tidal-decode": ("LLM/VLM", "-"), "token-select": ("LLM/VLM", "-"),
}


def test_presets_table(capsys):
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["preset", "model", "spans", "tuned", "for"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == list_presets() == sorted(EXPECTED)
    for name, (kind, spans) in EXPECTED.items():
        raw = yaml.safe_load((presets_dir() / f"{name}.yaml").read_text())
        assert rows[name][1:4] == [kind, spans, raw.get("tuned_for", "-")], name


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["apply", "act-lama", "--model", "smollm2", "--prompt", "hi"], "did you mean 'act-llama'"),
    (["apply", "noop", "--model", "./no/such/model", "--prompt", "hi"], "model folder ./no/such/model does not exist"),
    (["apply", "noop", "--model", "gpt2", "--prompt", "hi"], "'gpt2' is not a local folder and not in the Hugging"),
    (["apply", "pasta", "--model", "smollm2", "--prompt", "hi"], "reads the span 'emphasis': add --span emphasis="),
    (["apply", "pasta", "--model", "smollm2", "--prompt", "hi", "--span", "emphasys=hi"], "did you mean 'emphasis'"),
    (["apply", "pasta", "--model", "smollm2", "--prompt", "hi", "--span", "emphasis=bye"], "not part of --prompt"),
    (["apply", "pasta", "--model", "smollm2", "--prompt", "hi", "--span", "emphasis"], "write NAME=TEXT"),
    (["apply", "pag-sd", "--model", "smollm2", "--prompt", "a cat"], "pass --pipeline DIR"),
    (["apply", "noop", "--pipeline", ".", "--prompt", "a cat"], "needs a language model"),
    (["apply", "pag-sd", "--pipeline", "/no/pipe", "--prompt", "a cat"], "pipeline folder /no/pipe does not exist"),
    (["apply", "fastv", "--model", "smollm2", "--prompt", "hi"], "pass --image FILE"),
    (["apply", "noop", "--model", "smollm2", "--prompt", "hi", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["apply", "noop", "--prompt", "hi"], "needs --model"),
    (["show", "no/such.yaml"], "no/such.yaml does not exist"),
])
def test_user_errors_exit_2_before_loading(args, words, never_load, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(args) == 2
    assert words in one_line_error(capsys.readouterr().err)


def test_image_is_refused_for_text_only_models_before_loading(tmp_path, tiny_lm_dir, never_load, capsys):
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (8, 8)).save(image)
    assert cli.main(["apply", "noop", "--model", "smollm2", "--prompt", "hi", "--image", str(image)]) == 2
    assert "SmolLM2-135M-Instruct) is text-only" in one_line_error(capsys.readouterr().err)
    assert cli.main(["apply", "noop", "--model", str(tiny_lm_dir), "--prompt", "hi", "--image", str(image)]) == 2
    assert "is a text-only llama model" in one_line_error(capsys.readouterr().err)
    assert cli.main(["apply", "noop", "--model", "smollm2", "--prompt", "hi", "--image", str(tmp_path)]) == 2
    assert "no such file" in one_line_error(capsys.readouterr().err)


def test_cuda_device_refused_here(capsys, never_load):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["apply", "noop", "--model", "smollm2", "--prompt", "hi", "--device", "cuda"]) == 2
    assert "CUDA is not available" in one_line_error(capsys.readouterr().err)


def test_unknown_hub_name_fails_fast_without_network():
    """The real entry point with the hub neither switched off nor reachable: one line, exit 2, no retries (the old
    behaviour retried for ~50 s, beyond this test's timeout)."""
    if models.hub_reachable():
        pytest.skip("the hub is reachable from here")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = run_cli("apply", "noop", "--model", "gpt2", "--prompt", "hi", env=env, timeout=30)
    assert out.returncode == 2
    assert "the hub is unreachable" in one_line_error(out.stderr)


def test_dtype_and_device_reach_the_model(tiny_lm_dir, monkeypatch, capsys):
    """apply --dtype bfloat16 --device cpu: the loaded model is bf16 and the output is what that model generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: loaded.append(kw) or real_load(*a, **kw))
    prompt = "the cat sat on the"
    assert cli.main(["apply", "noop", "--model", str(tiny_lm_dir), "--prompt", prompt, "--raw", "--dtype",
                     "bfloat16", "--device", "cpu", "--max-new-tokens", "4"]) == 0
    assert loaded == [{"dtype": torch.bfloat16, "device": "cpu"}]
    out = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = tok.decode(model.generate(**ids, max_new_tokens=4, do_sample=False)[0, ids["input_ids"].shape[1]:],
                         skip_special_tokens=True)
    assert ref.strip() and cli._side_by_side(ref, ref) in out  # noop: both columns are the bf16 model's text


def test_span_ranges_come_from_the_user_message(smollm2):
    """--span finds TEXT in the user's message, not in the chat template's system prompt that also contains it."""
    from attnkit.spans import substring_spans

    _, tok = smollm2
    text, _ = cli._prompt_text(tok, "Please be helpful: what is 2+2?", raw=False)
    assert text.count("helpful") == 2  # SmolLM2's default system prompt says "helpful AI assistant"
    enc, ranges = cli._inputs(tok, "Please be helpful: what is 2+2?", None, spans={"emphasis": "helpful"})
    (start, end), = ranges["emphasis"][0]
    assert tok.decode(enc["input_ids"][0, start:end]).strip() == "helpful"
    user_start = len(tok(text[: text.rfind("Please")], add_special_tokens=False)["input_ids"])
    assert start >= user_start
    _, naive = substring_spans(tok, [text], ["helpful"], add_special_tokens=False)
    assert naive[0][0][0] < user_start  # what a plain first-occurrence search would have marked


@pytest.mark.slow
def test_apply_pasta_with_span_matches_the_python_api(smollm2, monkeypatch, capsys):
    model, tok = smollm2
    monkeypatch.setattr(cli, "_load", lambda path, image, **kw: (model, tok, None))
    prompt, emphasis = "Answer in French. What is the capital of Germany?", "Answer in French"
    assert cli.main(["apply", "pasta", "--model", "smollm2", "--prompt", prompt, "--span", f"emphasis={emphasis}",
                     "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    # reference: the documented Python route (chat template, offsets by hand, handle.set_span)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False, return_offsets_mapping=True)
    first = text.rfind(prompt)
    hits = [i for i, (s, e) in enumerate(enc.pop("offset_mapping")[0].tolist())
            if s < first + len(emphasis) and e > first and e > s]
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        base = tok.decode(model.generate(**enc, max_new_tokens=6, do_sample=False)[0, n:], skip_special_tokens=True)
        with attnkit.attach(model, "pasta") as handle:
            handle.set_span("emphasis", [[(hits[0], hits[-1] + 1)]])
            steered = tok.decode(model.generate(**enc, max_new_tokens=6, do_sample=False)[0, n:],
                                 skip_special_tokens=True)
    assert f"span emphasis: {emphasis!r}" in out
    assert cli._side_by_side(base, steered) in out


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from attnkit.testing import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny_sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def test_pag_preset_on_a_pipeline_folder(tiny_pipeline_dir, tmp_path):
    """apply pag-sd --pipeline DIR writes the stock and the PAG image, equal to the same runs in Python."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    out = run_cli("apply", "pag-sd", "--pipeline", str(tiny_pipeline_dir), "--prompt", "a red cat", "--steps", "2",
                  "--seed", "3", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert f"wrote {tmp_path / 'baseline.png'} (baseline) and {tmp_path / 'pag-sd.png'} (pag-sd)" in out.stdout
    got = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("baseline", "pag-sd")}
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return np.asarray(pipe("a red cat", num_inference_steps=2, guidance_scale=7.5,
                               generator=torch.Generator().manual_seed(3)).images[0])

    with torch.no_grad():
        stock = run()
        with attnkit.attach(pipe, "pag-sd"):
            guided = run()
    assert stock.shape == got["baseline"].shape == (8, 8, 3)
    assert np.array_equal(got["baseline"], stock) and np.array_equal(got["pag-sd"], guided)  # PNG is lossless
    assert np.abs(got["pag-sd"].astype(int) - got["baseline"]).max() > 2  # PAG changed the image


def test_prompt_to_prompt_preset_on_a_pipeline_folder(tiny_pipeline_dir, tmp_path):
    """apply prompt-to-prompt --target-prompt: one shared latent; the edited target equals the documented Python
    route (set_prompts + latents expanded), the source image is untouched, the target changes."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    source, target = "a red cat", "a blue cat"
    out = run_cli("apply", "prompt-to-prompt", "--pipeline", str(tiny_pipeline_dir), "--prompt", source,
                  "--target-prompt", target, "--steps", "3", "--seed", "5", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    got = {p.stem: np.asarray(Image.open(p)) for p in tmp_path.glob("*.png")}
    assert sorted(got) == ["baseline", "baseline-1", "prompt-to-prompt", "prompt-to-prompt-1"]
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    x_t = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5)).expand(2, -1, -1, -1)

    def run():
        return [np.asarray(im) for im in pipe([source, target], latents=x_t, num_inference_steps=3,
                                              guidance_scale=7.5, generator=torch.Generator().manual_seed(5)).images]

    with torch.no_grad():
        stock = run()
        with attnkit.attach(pipe, "prompt-to-prompt") as handle:
            handle.interventions[0].set_prompts([source, target])
            edited = run()
    assert np.array_equal(got["baseline"], stock[0]) and np.array_equal(got["baseline-1"], stock[1])
    assert np.array_equal(got["prompt-to-prompt-1"], edited[1])
    assert np.array_equal(got["prompt-to-prompt"], got["baseline"])  # the source is not edited
    assert not np.array_equal(got["prompt-to-prompt-1"], got["baseline-1"])


@pytest.mark.parametrize("args, words", [
    (["apply", "prompt-to-prompt", "--pipeline", "/p", "--prompt", "a cat"], "add --target-prompt TEXT"),
    (["apply", "pag-sd", "--pipeline", "/p", "--prompt", "a cat", "--target-prompt", "a dog"],
     "pag-sd does not edit prompts"),
    (["apply", "noop", "--model", "smollm2", "--prompt", "hi", "--target-prompt", "ho"], "prompt-editing diffusion"),
])
def test_target_prompt_errors(args, words, never_load, capsys):
    assert cli.main(args) == 2
    assert words in one_line_error(capsys.readouterr().err)


def test_undeclared_recipes_may_go_to_a_model_or_a_pipeline():
    from types import SimpleNamespace

    from attnkit.recipes.needs import Needs

    unknown = Needs("?", frozenset(), (), None, ("third-party",))
    for args in (SimpleNamespace(pipeline="p", model=None, image=None, span=[], target_prompt=[]),
                 SimpleNamespace(pipeline=None, model="m", image=None, span=["x=y"], target_prompt=[])):
        cli.check_target(unknown, args, "r")  # no refusal: attach decides
    cli.check_spans(unknown, {"anything": "y"}, "r")
    llm = Needs("LLM/VLM", frozenset({"text_decoder"}), (), None)
    with pytest.raises(cli.UsageError, match="pass --model, not --pipeline"):
        cli.check_target(llm, SimpleNamespace(pipeline="p", model=None, image=None, span=[], target_prompt=[]), "r")
