import numpy as np
import pytest
import torch

from attnkit.viz import save_figure, sink_view


def test_per_layer_lines(tmp_path):
    first = torch.tensor([0.1, 0.4, 0.7, 0.6])
    other = torch.tensor([0.05, 0.02, 0.01, 0.03])
    fig = sink_view(first, other, title="sinks")
    ax = fig.axes[0]
    assert len(fig.axes) == 1
    assert [line.get_label() for line in ax.lines] == ["first token", "other sinks"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), first.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), other.numpy(), rtol=1e-6)
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("sinks", "layer", "attention mass")
    assert ax.get_ylim() == (0.0, pytest.approx(0.77))
    assert len(ax.collections) == 0  # [L] input: no spread band
    save_figure(fig, tmp_path / "sinks.png")


def test_per_head_mean_with_range_band():
    mass = torch.tensor([[0.1, 0.3], [0.5, 0.9], [0.2, 0.2]])  # [L=3, H=2]
    fig = sink_view(mass)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.2, 0.7, 0.2], rtol=1e-6)
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.1) and ys.max() == pytest.approx(0.9)
    assert "min–max over heads" in [t.get_text() for t in ax.get_legend().get_texts()][1]


def test_std_spread_and_named_groups():
    mass = torch.tensor([[0.0, 0.2], [0.4, 0.4]])
    fig = sink_view(mass, {"'.'": torch.tensor([0.1, 0.2]), "'\\n'": torch.tensor([0.3, 0.1])}, spread="std")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["first token", "'.'", "'\\n'"]
    ys = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.0) and ys.max() == pytest.approx(0.4)  # 0.1 ± 0.1 and 0.4 ± 0


def test_bar_kind_draws_grouped_bars():
    fig = sink_view(torch.tensor([0.5, 0.6, 0.7]), torch.tensor([0.1, 0.1, 0.2]), kind="bar")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [0.5, 0.6, 0.7, 0.1, 0.1, 0.2], rtol=1e-6)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"first_token_mass must have shape \[L\] or \[L, H\] \(got shape \[2, 3, 4\]\)"):
        sink_view(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"other_sink_mass has shape \[3\] but first_token_mass has shape \[4\]"):
        sink_view(torch.rand(4), torch.rand(3))
    with pytest.raises(ValueError, match=r"spread must be one of"):
        sink_view(torch.rand(4), spread="iqr")
