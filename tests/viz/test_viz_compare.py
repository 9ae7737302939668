import doctest
import importlib

import numpy as np
import pytest
import torch

from attnkit.viz import attention_heatmap, before_after, head_score_grid, image_overlay, save_figure, sink_view


def test_heatmaps_side_by_side_share_one_scale(causal_probs, tmp_path):
    before, after = causal_probs * 0.5, causal_probs  # each side alone would get a different scale
    fig = before_after(before, after, attention_heatmap, tokens=list("abcde"), title="VAR")
    left, right = fig.subfigs
    assert (left.get_suptitle(), right.get_suptitle(), fig.get_suptitle()) == ("baseline", "intervened", "VAR")
    assert len(left.axes) == len(right.axes) == 4
    np.testing.assert_allclose(right.axes[0].images[0].get_array(), after[0].numpy(), rtol=1e-6)
    top = causal_probs.max().item()
    for sub in (left, right):
        assert sub.axes[0].images[0].get_clim() == (0.0, pytest.approx(top))
        assert sub.axes[-1].get_ylim() == (0.0, pytest.approx(top))  # the colour bars follow
    width, height = fig.get_size_inches()
    assert width > height  # side by side
    save_figure(fig, tmp_path / "ba.png")


def test_share_scale_off_keeps_own_limits(causal_probs):
    fig = before_after(causal_probs, causal_probs * 0.5, attention_heatmap, share_scale=False)
    his = [sub.axes[0].images[0].get_clim()[1] for sub in fig.subfigs]
    assert his[0] == pytest.approx(2 * his[1])


def test_wide_sink_views_stack_and_share_y_limits():
    fig = before_after(torch.rand(24, 4) * 0.8, torch.rand(24, 4) * 0.2, sink_view)
    (ax_a,), (ax_b,) = (sub.axes for sub in fig.subfigs)
    assert ax_a.get_ylim() == ax_b.get_ylim()
    width, height = fig.get_size_inches()
    assert height > 6.0 and width < 12.0  # two wide panels stacked, not a 20-inch strip
    fig.draw_without_rendering()
    assert ax_a.get_window_extent().y0 > ax_b.get_window_extent().y1  # baseline above intervened
    assert ax_a.get_title() == "baseline"


def test_keyword_and_mapping_data(rgb_image):
    fig = before_after(torch.linspace(0, 1, 12), torch.linspace(0.5, 3, 12), image_overlay, arg="token_attention",
                       image=rgb_image, grid=(3, 4))
    heats = [sub.axes[1].images[1] for sub in fig.subfigs]
    assert heats[0].get_clim() == heats[1].get_clim() == (0.0, 3.0)
    assert fig.subfigs[0].axes[-1].get_ylim() == (0.0, 3.0)  # the opaque colour bar follows the shared scale
    fig = before_after({"first_token_mass": torch.rand(4), "other_sink_mass": torch.rand(4)},
                       {"first_token_mass": torch.rand(4)}, sink_view, titles=("a", "b"))
    assert [len(sub.axes[0].lines) for sub in fig.subfigs] == [2, 1]


def test_head_scores_with_custom_titles():
    fig = before_after(torch.rand(3, 2), torch.rand(3, 2), head_score_grid, titles=("off", "on"))
    assert [sub.axes[0].get_title() for sub in fig.subfigs] == ["off", "on"]


def test_plot_fn_without_fig_keyword_is_rejected():
    with pytest.raises(TypeError, match=r"plot_fn 'plain' must accept keyword arguments fig= and title="):
        def plain(data):
            return data

        before_after(1, 2, plain)
    with pytest.raises(ValueError, match=r"titles must hold two strings"):
        before_after(torch.rand(2, 2), torch.rand(2, 2), head_score_grid, titles=("x",))


@pytest.mark.parametrize("module", ["compare", "heads", "heatmap", "io", "overlay", "sinks", "tokens", "__init__"])
def test_docstring_examples_run(module):
    mod = importlib.import_module("attnkit.viz" if module == "__init__" else f"attnkit.viz.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
