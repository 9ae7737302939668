"""benchmarks/triton_sweep.py on CPU (the Triton interpreter): every configuration's kernels are compared with the
default configuration's output, a configuration the kernels refuse is reported (not fatal), and the best per kernel
is only ever a configuration that ran and matched."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import triton_sweep  # noqa: E402

pytest.importorskip("triton")


def test_sweep_reports_each_configuration_against_the_default(tmp_path, capsys):
    out = tmp_path / "sweep.md"
    rc = triton_sweep.main(["--allow-cpu", "--n", "32", "--heads", "2", "--dim", "16", "--dtype", "fp32",
                            "--configs", "16x16", "32x16w4s2", "16x8", "--repeats", "1", "--out", str(out)])
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| 16x") or line.startswith("| 32x")}
    assert rc == 0 and set(rows) == {"16x16", "32x16w4s2", "16x8"}
    for config in ("16x16", "32x16w4s2"):  # ran: three timings, and the same output as 64x64 in fp32
        assert all(float(cell) > 0 for cell in rows[config][1:4]) and float(rows[config][4]) <= 1e-5
    assert rows["16x8"][1:4] == ["failed"] * 3 and "BLOCK_N must be a power of two" in rows["16x8"][5]


def test_a_configuration_that_failed_or_differs_is_never_the_best():
    rows = [dict(config="a", plain=0.5, partials=None, key_mass=2.0, err=0.0, note="partials: OutOfResources"),
            dict(config="b", plain=0.1, partials=0.1, key_mass=0.1, err=1.0,
                 note="differs from 64x64 beyond tolerance"),
            dict(config="c", plain=0.9, partials=1.5, key_mass=1.0, err=0.0, note="")]
    best = triton_sweep.best_per_kernel(rows)
    assert {name: row["config"] for name, row in best.items()} == {"plain": "a", "partials": "c", "key_mass": "c"}


def test_a_malformed_configuration_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        triton_sweep.main(["--configs", "64by64"])
    assert exit_info.value.code == 2 and "'64by64' is not MxN[wW][sS]" in capsys.readouterr().err


def test_docstring_examples():
    import doctest

    assert doctest.testmod(triton_sweep).failed == 0
