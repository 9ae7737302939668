"""Shared fixtures for the attnkit.viz tests: headless backend and small deterministic inputs."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def causal_probs():
    """[H=3, Q=5, K=5] causal attention probabilities with a strong first-token sink."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 5, 5, generator=gen)
    scores[..., 0] += 2.0
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)


@pytest.fixture
def rgb_image():
    """A 24x32 uint8 RGB gradient."""
    yy, xx = np.mgrid[0:24, 0:32]
    return np.stack([xx * 8, yy * 10, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
