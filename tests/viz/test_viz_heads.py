from dataclasses import dataclass

import numpy as np
import pytest
import torch

from attnkit.viz import head_score_grid, save_figure, top_k_heads


@dataclass
class FakeHeadScores:  # the duck-typed shape of attnkit.HeadScores
    scores: torch.Tensor
    method: str


SCORES = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.2, 0.8], [0.05, 0.6, 0.4], [0.7, 0.0, 0.35]])


def test_grid_data_ticks_and_colorbar(tmp_path):
    fig = head_score_grid(SCORES, title="my scores")
    ax, cbar = fig.axes
    np.testing.assert_allclose(ax.images[0].get_array(), SCORES.numpy(), rtol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("head", "layer", "my scores")
    assert cbar.get_ylabel() == "score"
    assert len(ax.texts) == SCORES.numel()  # small grid: every value written in its cell
    save_figure(fig, tmp_path / "heads.png")
    assert (tmp_path / "heads.png").exists()


def test_duck_typed_head_scores_uses_method_name():
    fig = head_score_grid(FakeHeadScores(SCORES, "retrieval"), annotate=False)
    assert fig.axes[0].get_title() == "head scores: retrieval"
    assert fig.axes[1].get_ylabel() == "retrieval"
    assert len(fig.axes[0].texts) == 0


def test_top_k_marks_best_heads_with_ranks():
    fig = head_score_grid(SCORES, top_k=3, annotate=False)
    ax = fig.axes[0]
    corners = [(p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches]  # (head, layer)
    assert corners == [(1, 0), (2, 1), (0, 3)]
    assert [t.get_text() for t in ax.texts] == ["1", "2", "3"]


def test_top_k_heads_order_smallest_and_nan():
    arr = np.array([[0.2, np.nan], [0.9, 0.1]])
    assert top_k_heads(arr, 5) == [(1, 0), (0, 0), (1, 1)]
    assert top_k_heads(arr, 1, largest=False) == [(1, 1)]


def test_nan_scores_are_masked():
    arr = SCORES.clone()
    arr[0, 0] = float("nan")
    image = head_score_grid(arr).axes[0].images[0]
    assert image.get_array().mask[0, 0] and not image.get_array().mask[1, 1]


def test_labels_and_errors():
    fig = head_score_grid(SCORES, layer_labels=["L0", "L4", "L8", "L12"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["L0", "L4", "L8", "L12"]
    with pytest.raises(ValueError, match=r"scores must have shape \[L, H\] \(layers × heads\) \(got shape \[2, 3, 4\]\)"):
        head_score_grid(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"layer_labels has 2 labels but the layer axis of scores has 4"):
        head_score_grid(SCORES, layer_labels=["a", "b"])
    with pytest.raises(TypeError, match=r"scores.scores must be a tensor or array of numbers"):
        head_score_grid(FakeHeadScores("oops", "m"))
