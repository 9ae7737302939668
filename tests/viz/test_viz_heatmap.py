import numpy as np
import pytest
import torch

from attnkit.viz import attention_heatmap, save_figure

TOKENS = ["<|im_start|>", "The", "capital", "of", "France"]


def _tick_texts(ax, axis):
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks]


def test_single_map_data_labels_and_colorbar(causal_probs, tmp_path):
    fig = attention_heatmap(causal_probs[0], tokens=TOKENS, title="layer 3 head 0", max_label_len=6)
    assert len(fig.axes) == 2  # the map and its colour bar
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), causal_probs[0].numpy(), rtol=1e-6)
    assert _tick_texts(ax, "x") == ["<|im_\u2026", "The", "capit\u2026", "of", "France"]
    assert _tick_texts(ax, "y") == _tick_texts(ax, "x")  # Q == K: queries default to the tokens
    assert fig.get_suptitle() == "layer 3 head 0"
    assert fig.axes[1].get_ylabel() == "attention"
    assert ax.images[0].get_clim() == (0.0, pytest.approx(causal_probs[0].max().item()))
    out = save_figure(fig, tmp_path / "maps" / "one.png")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


def test_heads_grid_one_panel_per_head_with_shared_scale(causal_probs):
    fig = attention_heatmap(causal_probs, tokens=TOKENS, head_ids=[4, 7, 9])
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["head 4", "head 7", "head 9"]
    assert len(fig.axes) == 4  # 3 heads + 1 colour bar; the empty 4th grid cell is removed
    for h, ax in enumerate(panels):
        np.testing.assert_allclose(ax.images[0].get_array(), causal_probs[h].numpy(), rtol=1e-6)
    assert len({ax.images[0].get_clim() for ax in panels}) == 1


def test_single_captured_row_stacks_heads_as_rows(causal_probs):
    rows = causal_probs[:, -1:, :]  # [H, 1, K]
    fig = attention_heatmap(rows, tokens=TOKENS)
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), rows[:, 0, :].numpy(), rtol=1e-6)
    assert _tick_texts(ax, "y") == ["head 0", "head 1", "head 2"]


def test_layers_by_heads_grid_titles():
    probs = torch.softmax(torch.randn(2, 2, 3, 3), -1)
    fig = attention_heatmap(probs, layer_ids=[5, 9])
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["layer 5 · head 0", "layer 5 · head 1", "layer 9 · head 0", "layer 9 · head 1"]
    np.testing.assert_allclose(fig.axes[3].images[0].get_array(), probs[1, 1].numpy(), rtol=1e-6)


def test_many_tokens_thins_tick_labels():
    n = 100
    fig = attention_heatmap(torch.softmax(torch.randn(n, n), -1), tokens=[f"t{i}" for i in range(n)], max_ticks=20)
    labels = _tick_texts(fig.axes[0], "x")
    assert 10 <= len(labels) <= 20
    assert labels[:3] == ["t0", "t5", "t10"]


def test_rectangular_rows_use_query_tokens_or_indices():
    probs = torch.softmax(torch.randn(2, 5), -1)  # two captured rows over 5 keys
    fig = attention_heatmap(probs, tokens=TOKENS)
    assert _tick_texts(fig.axes[0], "y") == ["0", "1"]
    fig = attention_heatmap(probs, tokens=TOKENS, query_tokens=["of", "France"])
    assert _tick_texts(fig.axes[0], "y") == ["of", "France"]


def test_log_scale_masks_zeros():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    fig = attention_heatmap(probs, log=True)
    assert type(fig.axes[0].images[0].norm).__name__ == "LogNorm"


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(5), r"probs must have shape \[Q, K\] or \[H, Q, K\] or \[L, H, Q, K\] \(got shape \[5\]\)"),
        (torch.rand(1, 1, 1, 2, 2), r"\(got shape \[1, 1, 1, 2, 2\]\)"),
        (torch.rand(0, 3), r"probs is empty \(got shape \[0, 3\]\)"),
    ],
)
def test_bad_shapes_name_argument_and_shapes(bad, match):
    with pytest.raises(ValueError, match=match):
        attention_heatmap(bad)


def test_token_count_mismatch_is_explained(causal_probs):
    with pytest.raises(ValueError, match=r"tokens has 4 labels but the key axis of probs \(shape \[3, 5, 5\]\) has 5"):
        attention_heatmap(causal_probs, tokens=TOKENS[:4])
    with pytest.raises(ValueError, match=r"head_ids has 2 entries but probs has H=3"):
        attention_heatmap(causal_probs, head_ids=[0, 1])
