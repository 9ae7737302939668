"""benchmarks/generate.py end to end on SmolLM2 with a short prompt: one row per arm, ratios that follow from the
times printed; and the paired-median estimator on a hand-computed case."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from generate import ratios  # noqa: E402


def test_ratios_pair_each_round_with_its_stock_run():
    # round 3 ran under load for both arms: best / best ignores it, the median of per-round ratios too
    best, paired = ratios([2.2, 2.0, 3.3], [2.0, 1.9, 3.0])
    assert best == pytest.approx(2.0 / 1.9)
    assert paired == pytest.approx(1.1)  # sorted(1.1, 1.0526, 1.1) → middle


@pytest.mark.slow
def test_generate_benchmark_runs_every_arm():
    from attnkit.models import smollm2_path

    try:
        smollm2_path()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"SmolLM2 weights not installed: {err}")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--prompt-tokens", "32",
                           "--new-tokens", "3", "--repeats", "1", "--threads", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {m.group(1): m for m in re.finditer(r"^\| (\w+) \| .* \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                                                proc.stdout, re.M)}
    assert set(rows) == {"stock", "identity", "temperature", "pasta", "reweight", "act"}
    stock = float(rows["stock"].group(2))
    for name, row in rows.items():  # one round: both ratios are this arm's time over stock's
        assert float(row.group(3)) == pytest.approx(float(row.group(2)) / stock, rel=0.05)  # seconds: 2 decimals
        assert float(row.group(4)) == pytest.approx(float(row.group(3)), abs=0.002)


def test_random_weights_run_without_the_weights_in_half_precision():
    """``--random-weights`` (for a GPU machine without the weights): SmolLM2's shape, bf16, one row per arm."""
    from generate import random_smollm2

    model = random_smollm2("cpu", torch.bfloat16)
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads, model.dtype) == (30, 3, torch.bfloat16)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--random-weights", "--dtype",
                           "bf16", "--prompt-tokens", "16", "--new-tokens", "2", "--repeats", "1", "--arms",
                           "identity", "act"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "random weights generate (cpu, bf16)" in proc.stdout
    arms = re.findall(r"^\| (\w+) \| ", proc.stdout, re.M)
    assert arms == ["arm", "stock", "identity", "act"]


def test_cuda_without_a_gpu_is_refused_in_one_sentence():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--device", "cuda",
                           "--random-weights"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "sees no CUDA device; use --device cpu" in proc.stderr
    assert "Traceback" not in proc.stderr
