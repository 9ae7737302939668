"""A-STAR (loss forms unverified: no official code): the worked examples, A&E's smoothing against diffusers' own
GaussianSmoothing, the latent update against finite differences of the loss, and generation end to end."""

import pytest
import torch

import attnkit
from attnkit.interventions.editing._common import CallInfo
from attnkit.interventions.editing.astar import (
    AStar,
    binarise,
    concept_maps,
    gaussian_kernel,
    generate,
    retention_loss,
    segregation_loss,
    step_sizes,
)
from attnkit.testing import tiny_pipeline


def test_worked_examples():
    a1, a2 = torch.tensor([[.6, .2], [.1, .1]]), torch.tensor([[.3, .5], [.1, .1]])
    assert float(segregation_loss([a1, a2])) == pytest.approx(0.35)
    prev, now = torch.tensor([[.7, .1], [.1, .1]]), torch.tensor([[.4, .4], [.1, .1]])
    assert binarise(prev).tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert float(retention_loss([now], [binarise(prev)])) == pytest.approx(0.75)
    sizes = step_sizes(50)
    assert [round(sizes[i], 4) for i in (0, 10, 24, 49)] == [20.0, 18.9521, 17.3793, 14.1421]


def attend_and_excite_smoothing():
    """diffusers' own GaussianSmoothing: the pipeline moved under ``deprecated`` in newer diffusers (0.35.2 has it
    at the top level)."""
    import importlib

    for package in ("diffusers.pipelines.deprecated", "diffusers.pipelines"):
        name = f"{package}.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite"
        try:
            return importlib.import_module(name).GaussianSmoothing
        except ModuleNotFoundError:
            continue
    raise AssertionError("diffusers has no Attend-and-Excite pipeline to compare against")


def test_smoothing_matches_diffusers_attend_and_excite():
    GaussianSmoothing = attend_and_excite_smoothing()

    reference = GaussianSmoothing()
    torch.testing.assert_close(gaussian_kernel(3, 0.5), reference.weight[0, 0])
    maps = torch.rand(4, 4, 8, generator=torch.Generator().manual_seed(0))
    text = torch.softmax(maps[:, :, 1:-1] * 100, -1)
    for index, got in zip([2, 4], concept_maps(maps, [2, 4])):
        padded = torch.nn.functional.pad(text[:, :, index - 1][None, None], (1, 1, 1, 1), mode="reflect")
        torch.testing.assert_close(got, reference(padded)[0, 0])


def test_latent_update_is_a_gradient_step_checked_by_finite_differences():
    pipe = tiny_pipeline("sd")
    method = AStar(token_indices=[2, 3], retention=False, map_queries=64, scale_factor=1e-3)
    text = pipe.encode_prompt("a red cat on the grass", "cpu", 1, False)[0]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    info = CallInfo(step=0, num_steps=1, timestep=51.0, batch=1, height=8, width=8)
    with attnkit.attach(pipe, method):
        loss = lambda x: (method._update(pipe.unet, x, torch.tensor(51), text, info), method.losses[-1]["total"])[1]  # noqa: E731
        z1 = method._update(pipe.unet, z, torch.tensor(51), text, info)
        grad = (z - z1) / 1e-3  # the update is z − α ∇L with α = 1e-3 · √1
        unit, eps = grad / grad.norm(), 0.02
        fd = (loss(z + eps * unit) - loss(z - eps * unit)) / (2 * eps)
        before, after = loss(z), loss(z1)
    assert float(grad.norm()) > 0
    assert fd == pytest.approx(float(grad.norm()), rel=5e-2)  # the derivative along ∇L/‖∇L‖ is ‖∇L‖
    assert after < before


def test_generate_runs_and_changes_the_image_only_in_its_window():
    pipe = tiny_pipeline("sd")
    kwargs = dict(num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    stock = pipe("a red cat on the grass", **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(0)
    out = generate(pipe, "a red cat on the grass", [2, 3], method=AStar(map_queries=64, max_iter_to_alter=2),
                   **kwargs)
    assert [e["step"] for e in out.losses] == [0, 1]
    assert out.losses[1]["retention"] > 0 and out.losses[0]["retention"] == 0  # retention needs a previous step
    assert torch.isfinite(out.images).all() and float((out.images - stock).abs().max()) > 1e-5


def test_refusals():
    with pytest.raises(attnkit.AttachError, match="token_indices"):
        attnkit.attach(tiny_pipeline("sd"), AStar())
    with pytest.raises(ValueError, match="no cross-attention layer has 7 queries"):
        generate(tiny_pipeline("sd"), "a cat", [1, 2], method=AStar(map_queries=7), num_inference_steps=1)
