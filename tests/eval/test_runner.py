"""Registry, runner with toy arms, report, kill-and-resume (injected fault, torn line, real SIGKILL), CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnkit.eval import get_task, list_tasks, read_records, run_eval
from attnkit.eval.registry import register_task_file
from attnkit.eval.runner import null_arm
from eval_arms import bias_arm, zero_arm

HERE = Path(__file__).parent
TQA = dict(batch_size=16)


def test_every_yaml_task_instantiates():
    names = list_tasks()
    assert {"pope_random", "pope_popular", "pope_adversarial", "chair", "truthfulqa_mc", "wikitext2_ppl",
            "wikitext2_streaming", "niah", "cost"} <= set(names)
    for n in names:
        t = get_task(n)
        assert t.name == n and t.metrics and t.primary_metric in t.metrics


def test_wrong_task_name_suggests():
    with pytest.raises(KeyError, match="did you mean 'pope_random'"):
        get_task("pope_randm")


def test_bad_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nparams: {}\n")
    with pytest.raises(ValueError, match="bad.yaml.*missing field 'class'"):
        register_task_file(bad)


def _run(model, tok, out, arms, limit=3, **kw):
    return run_eval(model, tok, get_task("truthfulqa_mc", **TQA), arms, limit=limit, out_dir=out,
                    progress=False, n_boot=100, **kw)


def test_toy_arms_paired_report(tiny_llama, byte_tok, tmp_path):
    rep = _run(tiny_llama, byte_tok, tmp_path, {"baseline": null_arm, "zero": zero_arm, "bias": bias_arm})
    task = get_task("truthfulqa_mc", **TQA)
    direct = [task.run_example(tiny_llama, byte_tok, ex) for ex in task.examples()[:3]]
    assert rep["arms"]["baseline"] == pytest.approx(task.aggregate(direct))
    assert rep["n_paired"] == 3
    for m in ("mc1", "mc2", "mc3"):
        assert rep["deltas"]["zero"][m] == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    recs = read_records(tmp_path)
    base = {r["id"]: r["lls"] for r in recs if r["arm"] == "baseline"}
    biased = {r["id"]: r["lls"] for r in recs if r["arm"] == "bias"}
    assert all(b != pytest.approx(base[i]) for i, b in biased.items())  # the arm really acted
    assert rep["deltas"]["bias"]["mc2"]["ci_low"] <= rep["deltas"]["bias"]["mc2"]["delta"] \
        <= rep["deltas"]["bias"]["mc2"]["ci_high"]
    md = (tmp_path / "report.md").read_text()
    assert "| bias |" in md and "Δ mc2 ↑" in md
    assert json.loads((tmp_path / "report.json").read_text())["n_paired"] == 3
    assert (tmp_path / "metric_vs_arm.png").stat().st_size > 0 and (tmp_path / "quality_vs_cost.png").exists()
    # the hook is gone after the run: stock model again
    assert task.run_example(tiny_llama, byte_tok, task.examples()[0])["lls"] == pytest.approx(direct[0]["lls"])


class Boom(RuntimeError):
    pass


def test_injected_failure_then_resume(tiny_llama, byte_tok, tmp_path):
    ref = _run(tiny_llama, byte_tok, tmp_path / "ref", {"baseline": null_arm, "bias": bias_arm}, limit=4,
               figures=False)
    task = get_task("truthfulqa_mc", **TQA)
    calls = {"n": 0}
    original = task.run_example

    def flaky(model, tok, ex):
        calls["n"] += 1
        if calls["n"] == 6:  # dies inside the second arm
            raise Boom("injected")
        return original(model, tok, ex)

    task.run_example = flaky
    with pytest.raises(Boom):
        run_eval(tiny_llama, byte_tok, task, {"baseline": null_arm, "bias": bias_arm}, limit=4,
                 out_dir=tmp_path / "run", progress=False, n_boot=100, figures=False)
    assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 5
    task.run_example = original
    rep = _run(tiny_llama, byte_tok, tmp_path / "run", {"baseline": null_arm, "bias": bias_arm}, limit=4,
               figures=False)
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    keys = [(json.loads(x)["arm"], json.loads(x)["id"]) for x in lines]
    assert len(keys) == 8 and len(set(keys)) == 8
    assert rep["arms"] == ref["arms"] and rep["deltas"] == ref["deltas"]


def test_torn_last_line_is_repaired(tiny_llama, byte_tok, tmp_path):
    _run(tiny_llama, byte_tok, tmp_path, {"baseline": null_arm}, limit=2, figures=False)
    path = tmp_path / "results.jsonl"
    first = path.read_text().splitlines()[0]
    path.write_text(first + "\n" + '{"arm": "baseline", "id": "1", "ll')  # killed mid-write
    assert len(read_records(tmp_path)) == 1
    rep = _run(tiny_llama, byte_tok, tmp_path, {"baseline": null_arm}, limit=2, figures=False)
    assert rep["n_paired"] == 2 and len(path.read_text().splitlines()) == 2


def test_mixing_tasks_in_one_folder_refused(tiny_llama, byte_tok, tmp_path):
    _run(tiny_llama, byte_tok, tmp_path, {"baseline": null_arm}, limit=1, figures=False)
    with pytest.raises(ValueError, match="task parameters .* use a new --out"):
        run_eval(tiny_llama, byte_tok, get_task("truthfulqa_mc", mc1_rule="argmax"), {"baseline": null_arm},
                 limit=1, out_dir=tmp_path, progress=False)


# ------------------------------------------------------------------------------------------ CLI / processes
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_llama, byte_tok):
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_llama.save_pretrained(d)
    byte_tok.save_pretrained(d)
    return d


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli(tiny_dir, out, recipes, limit, *extra):
    return [sys.executable, "-m", "attnkit.eval", "--model", str(tiny_dir), "--task", "truthfulqa_mc",
            "--recipes", *recipes, "--limit", str(limit), "--out", str(out), "--no-progress", "--n-boot", "100",
            "--set", "batch_size=16", *extra]


def test_cli_sigkill_then_resume(tiny_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(tiny_dir, out, ["baseline", "eval_arms:slow_arm"], 3, "--no-figures"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 4:  # inside the slow arm
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(results.read_text().splitlines())
    assert 4 <= n_before < 6
    done = subprocess.run(_cli(tiny_dir, out, ["baseline", "eval_arms:slow_arm"], 3, "--no-figures"), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    keys = [(r["arm"], r["id"]) for r in map(json.loads, results.read_text().splitlines())]
    assert len(keys) == 6 and len(set(keys)) == 6
    rep = json.loads((out / "report.json").read_text())
    # slow_arm changes nothing but speed: identical metrics to the baseline
    assert rep["arms"]["slow_arm"] == rep["arms"]["baseline"]
    assert "| slow_arm |" in done.stdout


LAUNCHERS = {  # the README's data-parallel commands, two CPU processes each
    "accelerate": ["-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
                   "--main_process_port", "29531", "--mixed_precision", "no", "--dynamo_backend", "no"],
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes(launcher, tiny_dir, tmp_path, tiny_llama, byte_tok):
    out = tmp_path / "dp"
    cmd = [sys.executable, *LAUNCHERS[launcher], "-m", "attnkit.eval",
           *_cli(tiny_dir, out, ["baseline", "eval_arms:bias_arm"], 4, "--no-figures")[3:]]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 0/2 (rank/world)" in done.stderr and "process 1/2 (rank/world)" in done.stderr
    per_rank = {p.name: [json.loads(x) for x in p.read_text().splitlines()] for p in out.glob("results*.jsonl")}
    assert sorted(per_rank) == ["results.rank0.jsonl", "results.rank1.jsonl"]
    assert sorted(r["id"] for r in per_rank["results.rank0.jsonl"]) == ["0", "0", "2", "2"]
    assert sorted(r["id"] for r in per_rank["results.rank1.jsonl"]) == ["1", "1", "3", "3"]
    rep = json.loads((out / "report.json").read_text())
    single = _run(tiny_llama, byte_tok, tmp_path / "single", {"baseline": null_arm, "bias": bias_arm}, limit=4,
                  figures=False)
    assert rep["n_paired"] == 4
    for arm, name in (("baseline", "baseline"), ("bias_arm", "bias")):
        assert rep["arms"][arm] == pytest.approx(single["arms"][name], abs=1e-6)
