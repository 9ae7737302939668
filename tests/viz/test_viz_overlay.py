import numpy as np
import pytest
import torch
from PIL import Image

from attnkit.viz import as_image, cross_attention_maps, image_overlay, save_figure, to_grid


def test_image_overlay_structure_and_data(rgb_image, tmp_path):
    att = torch.arange(12, dtype=torch.float32)  # [h*w] for a 3x4 patch grid
    fig = image_overlay(rgb_image, att, grid=(3, 4), title="token 'cat'")
    picture_ax, overlay_ax, cbar = fig.axes
    np.testing.assert_allclose(picture_ax.images[0].get_array(), rgb_image / 255.0)
    base, heat = overlay_ax.images
    np.testing.assert_allclose(heat.get_array(), att.reshape(3, 4).numpy())
    assert heat.get_extent() == [0, 32, 24, 0]  # upsampled to the image size
    assert heat.get_alpha() == pytest.approx(0.55)
    assert heat.get_clim() == (0.0, 11.0)
    assert cbar.get_ylabel() == "attention" and fig.get_suptitle() == "token 'cat'"
    save_figure(fig, tmp_path / "overlay.png")


def test_image_overlay_pil_span_heads_and_normalize(rgb_image):
    row = torch.zeros(2, 20)  # [heads, K] over the whole sequence; image tokens at 3..12
    row[0, 3:12] = torch.arange(9.0)
    row[1, 3:12] = 1.0
    fig = image_overlay(Image.fromarray(rgb_image), row, span=(3, 12), normalize=True, show_image=False)
    assert len(fig.axes) == 2
    heat = fig.axes[0].images[1].get_array()
    expected = ((torch.arange(9.0) + 1.0) / 2).reshape(3, 3).numpy()  # square grid inferred
    np.testing.assert_allclose(heat, expected / expected.sum())
    assert fig.axes[1].get_ylabel() == "share of image attention"


def test_image_overlay_errors(rgb_image):
    with pytest.raises(ValueError, match=r"token_attention must have shape \[h\*w\] = \[12\] or \[h, w\] = \[3, 4\]"
                                         r" for grid=\(3, 4\) \(got shape \[10\]\)"):
        image_overlay(rgb_image, torch.rand(10), grid=(3, 4))
    with pytest.raises(ValueError, match=r"token_attention has 10 spatial tokens .* not a square number"):
        image_overlay(rgb_image, torch.rand(10))
    with pytest.raises(ValueError, match=r"image must have shape \[H, W, 3\], \[H, W, 4\] or \[H, W\] \(got shape \[5\]\)"):
        image_overlay(np.zeros(5), torch.rand(4))
    with pytest.raises(ValueError, match=r"span=\(3, 30\) must satisfy 0 <= start < end <= 20"):
        image_overlay(rgb_image, torch.rand(20), span=(3, 30))


def test_as_image_and_to_grid_conversions():
    chw = torch.rand(3, 4, 5)
    np.testing.assert_allclose(as_image(chw), chw.permute(1, 2, 0).numpy(), rtol=1e-6)
    assert as_image(np.full((2, 2), 255, dtype=np.uint8)).max() == 1.0
    assert to_grid(np.arange(4.0), None, "x").shape == (2, 2)


TOKENS = ["<sot>", "a", "red", "cat"]


def test_cross_attention_mean_over_steps(tmp_path):
    maps = torch.rand(3, 4, 16)  # [steps, T, 4*4]
    fig = cross_attention_maps(maps, TOKENS, token_indices=[1, 2, 3])
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["a", "red", "cat"]
    assert len(fig.axes) == 4  # 3 maps + colour bar
    np.testing.assert_allclose(panels[2].images[0].get_array(), maps.mean(0)[3].reshape(4, 4).numpy(), rtol=1e-6)
    assert fig.get_suptitle() == "cross-attention (mean over 3 steps)"
    lo, hi = panels[0].images[0].get_clim()
    assert lo == pytest.approx(maps.mean(0)[1:].min().item()) and hi == pytest.approx(maps.mean(0)[1:].max().item())
    save_figure(fig, tmp_path / "xattn.png")


def test_cross_attention_per_step_rows_and_per_token_normalisation():
    maps = torch.rand(4, 2, 6)  # latent 2x3
    fig = cross_attention_maps(maps, ["cat", "dog"], latent_grid=(2, 3), step=[0, 3], normalize="per_token")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    assert [ax.get_ylabel() for ax in panels] == ["step 0", "", "step 3", ""]
    got = panels[3].images[0].get_array()  # step 3, "dog"
    ref = maps[3, 1].reshape(2, 3).numpy()
    np.testing.assert_allclose(got, (ref - ref.min()) / (ref.max() - ref.min()), rtol=1e-6)
    assert fig.axes[-1].get_ylabel() == "relative (per token)"


def test_cross_attention_over_image(rgb_image):
    fig = cross_attention_maps(torch.rand(2, 9), ["a", "cat"], image=rgb_image)
    ax = fig.axes[0]
    assert len(ax.images) == 2 and ax.images[1].get_extent() == [0, 32, 24, 0]


def test_cross_attention_errors():
    with pytest.raises(ValueError, match=r"maps must have shape \[T, h\*w\] or \[steps, T, h\*w\] \(got shape \[5\]\)"):
        cross_attention_maps(torch.rand(5), ["a"])
    with pytest.raises(ValueError, match=r"tokens has 3 labels but the token axis of maps \(shape \[2, 16\]\) has 2"):
        cross_attention_maps(torch.rand(2, 16), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"step 5 is out of range for maps with 3 steps"):
        cross_attention_maps(torch.rand(3, 2, 16), ["a", "b"], step=5)
    with pytest.raises(ValueError, match=r"maps must have shape \[h\*w\] = \[12\]"):
        cross_attention_maps(torch.rand(2, 16), ["a", "b"], latent_grid=(3, 4))
