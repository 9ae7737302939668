"""`make demo` runs the real job: SmolLM2 sink mass per layer and two PNGs."""

from attnkit import demo


def test_demo_prints_sink_mass_and_writes_figures(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--prompt", "The capital of France is Paris, a city", "--layers", "0,20"]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line[:5].strip().isdigit()]
    assert len(rows) == 30  # one line per layer
    late = [float(line.split()[-2]) for line in rows[12:]]
    assert sum(late) / len(late) > 0.3  # the attention sink on real weights
    for name in ("sink.png", "heads.png"):
        assert (tmp_path / name).stat().st_size > 10_000
