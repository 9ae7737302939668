"""benchmarks/gpu_models.py on CPU (its smoke mode): every cell of the table compares a fused backend with eager
(fp32) or with the fp32 eager run (bf16), and a backend that lacks a capability reads n/a, not a failure."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_models  # noqa: E402


def test_cells_compare_fused_backends_with_eager(tmp_path):
    out = tmp_path / "models.md"
    rc = gpu_models.main(["--allow-cpu", "--families", "llama", "--dtypes", "fp32", "bf16", "--backends", "torch",
                          "flex", "--methods", "act", "head-temperature", "--out", str(out)])
    text = out.read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| llama |")]
    assert rc == 0 and len(rows) == 2 * 2 * 2  # dtypes x methods x backends
    cells = {(r[1], r[2], r[3]): r for r in rows}
    assert cells[("fp32", "act", "flex")][4] == "n/a"  # compiled flex on CPU returns no LSE: no group_factors
    fp32 = cells[("fp32", "act", "torch")]
    assert fp32[4] == "torch" and float(fp32[5]) <= 1e-4 and fp32[8] == "18/18"  # 3 samples x 6 greedy tokens
    bf16 = cells[("bf16", "head-temperature", "torch")]
    assert 0 < float(bf16[6]) and float(bf16[5]) <= float(bf16[7])  # eager's own bf16 error sets the tolerance


def test_refuses_to_run_without_a_gpu_unless_asked(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script runs")
    assert gpu_models.main(["--out", "/dev/null"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
