"""The eval harness as a user meets it (issue 14): provenance, refusing to resume into another run's folder,
checking every arm and input before anything runs, one-line user errors, typed task YAML with includes,
descriptions that follow overrides, metric directions, progress, figures, launch messages, POPE from parquet."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.eval import get_task, run_eval
from attnkit.eval.__main__ import _launch_note, main, resolve_device
from attnkit.eval.errors import EvalError
from attnkit.eval.registry import TASKS, register_task_file, task_spec
from attnkit.eval.runner import null_arm, run_shard
from eval_arms import bias_arm

TQA = dict(batch_size=16)
REPO = Path(__file__).resolve().parents[2]


def _tqa_run(model, tok, out, arms, limit=2, **kw):
    return run_eval(model, tok, get_task("truthfulqa_mc", **TQA), arms, limit=limit, out_dir=out, progress=False,
                    n_boot=50, figures=False, **kw)


# ------------------------------------------------------------------------------------------ provenance
def test_provenance_in_run_and_report(tiny_llama, byte_tok, tmp_path):
    rep = _tqa_run(tiny_llama, byte_tok, tmp_path, ["baseline", "noop"], model_name="tiny-llama-test")
    run = json.loads((tmp_path / "run.json").read_text())
    noop_yaml = attnkit.load_recipe("noop").to_yaml()
    for prov in (run, rep["provenance"], json.loads((tmp_path / "report.json").read_text())["provenance"]):
        assert prov["model"]["name_or_path"] == "tiny-llama-test"
        assert prov["model"]["dtype"] == "torch.float32" and prov["model"]["device"] == "cpu"
        assert prov["model"]["class"] == "LlamaForCausalLM"
        assert prov["arms"]["baseline"] == {"kind": "baseline"}
        assert prov["arms"]["noop"]["yaml"] == noop_yaml
        assert prov["arms"]["noop"]["sha256"] == hashlib.sha256(noop_yaml.encode()).hexdigest()
        assert prov["versions"]["torch"] == torch.__version__
        import transformers

        assert prov["versions"]["transformers"] == transformers.__version__
        assert prov["versions"]["attnkit"] == attnkit.__version__ and "diffusers" in prov["versions"]
        assert prov["created"][:4].isdigit() and "T" in prov["created"]
    if (REPO / ".git").exists():  # the test runs from a checkout: the commit is the checkout's HEAD
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert run["git"]["commit"] == head.strip()
    md = (tmp_path / "report.md").read_text()
    assert "## Provenance" in md and "tiny-llama-test" in md and run["arms"]["noop"]["sha256"][:16] in md
    assert f"torch {torch.__version__}" in md


# ------------------------------------------------------------------------------------------ resume refusals
def test_resume_refuses_other_dtype_recipe_task_or_model(tiny_llama, byte_tok, tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "a" / "mine.yaml"
    recipe.parent.mkdir()
    recipe.write_text("name: mine\nversion: 1\ninterventions:\n  - method: noop\n")
    ref = _tqa_run(tiny_llama, byte_tok, out, ["baseline", str(recipe)])
    assert _tqa_run(tiny_llama, byte_tok, out, ["baseline", str(recipe)])["arms"] == ref["arms"]  # resumes
    import copy

    half = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    with pytest.raises(EvalError, match=r"model dtype 'torch.float32' \(this run: 'torch.bfloat16'\).*new --out"):
        _tqa_run(half, byte_tok, out, ["baseline", str(recipe)])
    other = tmp_path / "b" / "mine.yaml"  # same arm name, different recipe
    other.parent.mkdir()
    other.write_text("name: mine\nversion: 2\ninterventions:\n  - method: noop\n")
    with pytest.raises(EvalError, match=r"arm 'mine' recipe \(sha256\)"):
        _tqa_run(tiny_llama, byte_tok, out, ["baseline", str(other)])
    with pytest.raises(EvalError, match="task 'truthfulqa_mc'"):
        run_eval(tiny_llama, byte_tok, get_task("wikitext2_ppl", block_tokens=64), ["baseline"], limit=1,
                 out_dir=out, progress=False)
    with pytest.raises(EvalError, match="model 'first'"):
        _tqa_run(tiny_llama, byte_tok, tmp_path / "named", ["baseline"], model_name="first")
        _tqa_run(tiny_llama, byte_tok, tmp_path / "named", ["baseline"], model_name="second")
    assert len((out / "results.jsonl").read_text().splitlines()) == 4  # nothing was added by the refused runs


# ------------------------------------------------------------------------------------------ arms checked first
def test_every_arm_attached_once_before_any_arm_runs(tiny_llama, byte_tok, tmp_path):
    with pytest.raises(EvalError, match=r"arm 'pag-sd' cannot be attached to this model \(LlamaForCausalLM\)"):
        _tqa_run(tiny_llama, byte_tok, tmp_path, ["baseline", "noop", "pag-sd"])
    assert not (tmp_path / "results.jsonl").exists()  # the baseline did not run first
    entered = []

    def counting(model):
        entered.append(1)
        return bias_arm(model)

    _tqa_run(tiny_llama, byte_tok, tmp_path / "ok", {"baseline": null_arm, "bias": counting})
    assert len(entered) == 2  # once to check, once to run


def test_misspelled_recipe_fails_when_the_arm_is_made():
    from attnkit.eval.runner import arm_from_spec

    with pytest.raises(EvalError, match="arm 'act-lama': unknown recipe 'act-lama'; did you mean 'act-llama'"):
        arm_from_spec("act-lama")
    with pytest.raises(EvalError, match="cannot import 'nothing' from module 'eval_arms'"):
        arm_from_spec("eval_arms:nothing")


# ------------------------------------------------------------------------------------------ CLI user errors
BAD = [
    (["--task", "pope_randm"], "unknown eval task 'pope_randm'; did you mean 'pope_random'"),
    (["--task", "pope_random", "--set", "splt=popular"], "params.splt: unknown parameter 'splt'; did you mean "
                                                          "'split'?"),
    (["--task", "pope_random", "--set", "split=rnd"], "params.split: expected one of 'random', 'popular', "
                                                       "'adversarial', got str 'rnd'"),
    (["--task", "pope_random", "--set", "batch_size=[1"], "--set batch_size=[1: the value is not valid YAML"),
    (["--task", "truthfulqa_mc", "--set", "path=/nonexistent/tqa.csv"], "task 'truthfulqa_mc' needs "
                                                                         "/nonexistent/tqa.csv, which does not exist"),
    (["--task", "truthfulqa_mc", "--limit", "0"], "argument --limit: expected a positive integer"),
    (["--task", "truthfulqa_mc", "--limit", "-3"], "argument --limit: expected a positive integer"),
    (["--task", "truthfulqa_mc", "--limit", "ten"], "argument --limit: expected a positive integer, got 'ten'"),
    (["--task", "truthfulqa_mc", "--recipes", "baseline", "act-lama"], "did you mean 'act-llama'"),
    (["--task", "truthfulqa_mc", "--recipes", "baseline", "missing.yaml"], "recipe file missing.yaml does not exist"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a[1:]) for a, _ in BAD])
def test_cli_user_errors_before_the_model_loads(args, message, tmp_path, capsys):
    """``--model`` names a path that does not exist: any error about the model would mean it was loaded first."""
    argv = ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), *args]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "no-model" not in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_missing_data_root_and_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNKIT_DATA", str(tmp_path / "empty"))
    assert main(["--model", str(tmp_path / "m"), "--task", "chair", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "task 'chair' needs" in err and "chair_vocab.json" in err and "ATTNKIT_DATA" in err
    monkeypatch.delenv("ATTNKIT_DATA")
    assert main(["--model", str(tmp_path / "m"), "--task", "truthfulqa_mc", "--limit", "1",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "could not be loaded" in err and len(err.strip().splitlines()) == 2  # + rank line
    if not torch.cuda.is_available():
        assert main(["--model", "x", "--task", "truthfulqa_mc", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err


def test_cli_dtype_resume_refused_before_loading(tiny_dir, tmp_path):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "attnkit.eval", "--model", str(tiny_dir), "--task", "truthfulqa_mc", "--limit",
            "1", "--set", "batch_size=16", "--no-progress", "--no-figures", "--n-boot", "20", "--out", str(out)]
    env = _env()
    first = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "process 0/1 (rank/world) on cpu" in first.stderr
    again = subprocess.run(base + ["--dtype", "bfloat16"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines() == [
        f"attnkit eval: error: {out} holds results made with model dtype 'torch.float32' (this run: "
        f"'torch.bfloat16'); resuming would mix the two, so use a new --out or rerun with the same settings."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_llama, byte_tok):
    d = tmp_path_factory.mktemp("tiny_model_h")
    tiny_llama.save_pretrained(d)
    byte_tok.save_pretrained(d)
    return d


def _env():
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------------------------------ task YAML
def test_shipped_tasks_use_the_shared_registry_and_includes():
    from attnkit.registry import Registry

    assert isinstance(TASKS, Registry) and "pope_random" in TASKS
    base, popular = get_task("pope_random").params, get_task("pope_popular").params
    assert popular == {**base, "split": "popular"}
    assert get_task("pope_adversarial").params == {**base, "split": "adversarial"}
    tasks_dir = Path(attnkit.__file__).parent / "eval" / "tasks"
    assert (tasks_dir / "pope_popular.yaml").read_text().count("\n") <= 4  # a variant, not a copy
    streaming = get_task("wikitext2_streaming").params
    assert streaming["mode"] == "streaming" and streaming["split"] == "test"  # split comes from wikitext2_ppl.yaml


def test_task_yaml_errors_name_file_line_and_suggest(tmp_path):
    def write(name, text):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    bad_key = write("k.yaml", "name: k\nclass: attnkit.eval.metrics.pope:PopeTask\ndescripton: x\n")
    with pytest.raises(EvalError, match=r"k.yaml:3: unknown key 'descripton'; did you mean 'description'\?"):
        register_task_file(bad_key)
    bad_param = write("p.yaml", "name: p\ninclude: base.yaml\nparams:\n  split: popular\n  max_new_tokns: 4\n")
    write("base.yaml", "name: base\nclass: attnkit.eval.metrics.pope:PopeTask\nparams:\n  seed: 1\n")
    with pytest.raises(EvalError, match=r"p.yaml:5: params.max_new_tokns: unknown parameter 'max_new_tokns'; "
                                        r"did you mean 'max_new_tokens'\?"):
        register_task_file(bad_param)
    wrong_type = write("t.yaml", "name: t\ninclude: base.yaml\nparams:\n  seed: one\n")
    with pytest.raises(EvalError, match=r"t.yaml:4: params.seed: expected int, got str 'one'"):
        get_task(str(wrong_type))
    good = write("g.yaml", "name: my_pope\ninclude: base.yaml\nparams:\n  split: adversarial\n")
    task = get_task(str(good))
    assert task.name == "my_pope" and task.params["seed"] == 1 and task.params["split"] == "adversarial"
    loop = write("l1.yaml", "name: l1\ninclude: l2.yaml\n")
    write("l2.yaml", "name: l2\ninclude: l1.yaml\n")
    with pytest.raises(EvalError, match="include each other"):
        task_spec(str(loop))
    with pytest.raises(EvalError, match="missing field 'class'"):
        task_spec(str(write("n.yaml", "name: n\nparams: {}\n")))


def test_descriptions_follow_overrides(tiny_llama, byte_tok, tmp_path):
    assert "coco_tiny" in get_task("pope_random").describe()
    from_file = get_task("pope_random", source="pope_file").describe()
    assert "coco_pope_random.json" in from_file and "coco_tiny" not in from_file
    assert "dataset /x/pope" in get_task("pope_adversarial", source="datasets", dataset="/x/pope").describe()
    assert "max_length 128, stride 64" in get_task("wikitext2_ppl", max_length=128, stride=64).describe()
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"question_id": i, "image": "x.jpg", "text": "Is there a dog?", "label": lab})
                          + "\n" for i, lab in enumerate(["yes", "no"])))
    task = get_task("pope_random", question_file=str(qs), max_new_tokens=2, batch_size=2)
    rep = run_eval(tiny_llama, byte_tok, task, ["baseline"], out_dir=tmp_path / "o", progress=False, n_boot=20,
                   figures=False)
    md = (tmp_path / "o" / "report.md").read_text()
    assert md.splitlines()[2].startswith(f"POPE (random negatives): questions from the file {qs}")
    assert rep["better"]["yes_ratio"] == "closer to 0.5" and rep["better"]["f1"] == "higher"
    assert "Better: f1 higher" in md and "yes_ratio closer to 0.5" in md


# ------------------------------------------------------------------------------------------ progress, figures
def test_progress_bar_names_arm_and_example(tiny_llama, byte_tok, tmp_path, capsys):
    task = get_task("truthfulqa_mc", **TQA)
    run_shard(tiny_llama, byte_tok, task, {"baseline": null_arm, "bias": bias_arm}, task.examples()[:2], tmp_path,
              progress=True)
    err = capsys.readouterr().err
    assert "arm baseline" in err and "arm bias" in err and "example 1" in err


def test_figures_keep_titles_inside_and_show_cis(tiny_llama, byte_tok, tmp_path):
    from attnkit.eval.report import cost_figure, metric_figure

    rep = _tqa_run(tiny_llama, byte_tok, tmp_path, {"baseline": null_arm, "bias": bias_arm}, limit=4)
    rep["task"] = "a_rather_long_task_name_for_the_title"
    for fig in (metric_figure(rep), cost_figure(rep)):
        fig.canvas.draw()
        ax = fig.axes[0]
        box = ax.title.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
    lo, hi = rep["ci"]["bias"]["mc2"]
    assert lo <= rep["arms"]["bias"]["mc2"] <= hi and hi > lo
    ax = metric_figure(rep).axes[0]
    segments = [c for c in ax.collections if c.get_segments()]  # the error bars
    spans = sorted(round(abs(s[1][1] - s[0][1]), 6) for s in segments[0].get_segments())
    widths = sorted(round(rep["ci"][a]["mc2"][1] - rep["ci"][a]["mc2"][0], 6) for a in ("baseline", "bias"))
    assert spans == widths


# ------------------------------------------------------------------------------------------ launching
def test_launch_messages(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --num_processes 2` sets for 1 process
    assert "started only this one" in _launch_note(1) and "torchrun --nproc_per_node N" in _launch_note(1)
    assert _launch_note(2) is None
    monkeypatch.delenv("MASTER_ADDR")
    assert _launch_note(1) is None  # `accelerate launch` with one process asked for
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else
                                           "mps" if torch.backends.mps.is_available() else "cpu")


# ------------------------------------------------------------------------------------------ POPE from datasets
def _pope_rows(n=4):
    from PIL import Image

    rows = []
    for i in range(n):
        img = Image.new("RGB", (8, 8), (40 * i, 0, 0))
        import io

        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append({"question_id": i, "question": f"Is there a thing {i} in the image?",
                     "answer": "yes" if i % 2 == 0 else "no", "category": "random" if i < 3 else "popular",
                     "image": {"bytes": buf.getvalue(), "path": None}})
    return rows


def test_pope_from_parquet_snapshot_and_data_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    from attnkit.eval.metrics.pope import load_questions_dataset

    features = datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "category": datasets.Value("string"),
                                  "image": datasets.Image()})
    ds = datasets.Dataset.from_list(_pope_rows(), features=features)
    snapshot = tmp_path / "POPE"  # the layout of a hub snapshot: data/<split>-XXXXX-of-XXXXX.parquet
    (snapshot / "data").mkdir(parents=True)
    ds.to_parquet(str(snapshot / "data" / "test-00000-of-00001.parquet"))
    expected = [{"question_id": str(i), "text": f"Is there a thing {i} in the image?",
                 "label": "yes" if i % 2 == 0 else "no", "image": None, "index": i} for i in range(3)]
    rows, loaded = load_questions_dataset(snapshot, category="random")
    assert rows == expected and loaded[0]["image"].size == (8, 8)
    rows, _ = load_questions_dataset(snapshot / "data" / "test-00000-of-00001.parquet", category="random")
    assert rows == expected
    rows, _ = load_questions_dataset("parquet", category="random",
                                     data_files={"test": str(snapshot / "data" / "test-00000-of-00001.parquet")})
    assert rows == expected
    task = get_task("pope_random", source="datasets", dataset=str(snapshot), batch_size=2)
    assert [e["id"] for e in task.examples()] == ["0", "1", "2"]
    assert task._image(task.examples()[1]).size == (8, 8)
    with pytest.raises(EvalError, match="source=datasets needs the `dataset` parameter"):
        get_task("pope_random", source="datasets")
