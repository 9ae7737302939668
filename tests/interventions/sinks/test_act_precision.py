"""ACT when sinks take almost all of a row: the non-sink mass must be summed, never taken as "total − sink mass".

Before the fix, a row whose sink mass is 1 − 1e-7 got its non-sink mass wrong by ~20 % in fp32, and on real
SmolLM2 (act-llama) batched vs per-sample prefill logits differed by 1.3e-3 and fp32 vs fp64 copies by 1.4e-3.
"""

import copy
import doctest
import warnings

import pytest
import torch

import attnkit
from attnkit.interventions.sinks import act as act_module
from attnkit.interventions.sinks.act import act_calibrate_row, act_factors
from attnkit.kernels.grouped import combine_groups, group_mass, group_partials

warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*did not run.*")

SINK = 1 - 1e-7
BETA = 0.4


def exact_row(others: int = 5) -> torch.Tensor:
    """fp64 calibrated row for probabilities [S, r, r, …] with the sink first: sink ×β, the rest get the freed mass."""
    rest_new = (1 - SINK) + (1 - BETA) * SINK
    return torch.tensor([BETA * SINK] + [rest_new / others] * others, dtype=torch.float64)


def test_hand_case_on_materialised_row():
    probs = torch.tensor([SINK] + [(1 - SINK) / 5] * 5, dtype=torch.float64).float()
    sinks = torch.tensor([True] + [False] * 5)
    got = act_calibrate_row(probs, sinks, beta=BETA).double()
    want = exact_row()
    torch.testing.assert_close(got[1:] / want[1:], torch.ones(5, dtype=torch.float64), atol=0, rtol=1e-5)


def test_hand_case_on_group_masses():
    mass = torch.tensor([1 - SINK, SINK]).view(1, 1, 1, 2)  # fp32 [B,H,Q,G]: group 1 is the sink group
    factors = act_factors(mass, torch.tensor([[[False, True]]]), BETA)
    new = (mass * factors).double()[0, 0, 0]
    want = exact_row(1)
    torch.testing.assert_close(new / want.flip(0), torch.ones(2, dtype=torch.float64), atol=0, rtol=1e-6)


def test_hand_case_through_the_fused_kernel():
    """One decode row, v = identity so the output is the calibrated row: fused partials + act_factors."""
    K = 6
    row = torch.tensor([SINK] + [(1 - SINK) / (K - 1)] * (K - 1), dtype=torch.float64)
    q = torch.zeros(1, 1, 1, 16)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, K, 16)
    k[0, 0, :, 0] = torch.log(row).float()  # scale 1: scores = log row
    v = torch.zeros(1, 1, K, 16)
    v[0, 0, torch.arange(K), torch.arange(K)] = 1.0
    groups = torch.zeros(1, K, dtype=torch.long)
    groups[0, 0] = 1
    out_g, lse_g = group_partials(q, k, v, groups, 2, scale=1.0)
    factors = act_factors(group_mass(lse_g), torch.tensor([[[False, True]]]), BETA)
    got = combine_groups(out_g, lse_g, factors)[0, 0, 0, :K].double()
    want = exact_row(K - 1)
    torch.testing.assert_close(got / want, torch.ones(K, dtype=torch.float64), atol=0, rtol=1e-5)


def test_docstring_examples():
    assert doctest.testmod(act_module).failed == 0


PROMPTS = ["The capital of France is Paris, and the capital of Germany is Berlin. The capital of Italy is",
           "Water boils at one hundred degrees Celsius at sea level. At high altitude it boils at",
           "One, two, three, four, five,"]


@pytest.mark.slow
def test_act_llama_batched_equals_per_sample_on_smollm2(smollm2):
    model, tok = smollm2
    recipe = attnkit.load_recipe("act-llama")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert len(set(enc.attention_mask.sum(1).tolist())) == 3  # three different left paddings
    with attnkit.attach(model, recipe) as handle, torch.no_grad():
        assert {m["backend"] for m in handle.report()["modules"]} == {"torch"}
        batched = model(**enc).logits
        for i, prompt in enumerate(PROMPTS):
            alone = model(**tok([prompt], return_tensors="pt")).logits[0]
            assert (batched[i, -alone.shape[0]:] - alone).abs().max() <= 1e-4


@pytest.mark.slow
def test_act_llama_fp32_matches_fp64_on_smollm2(smollm2):
    model, tok = smollm2
    recipe = attnkit.load_recipe("act-llama")
    ids = tok([PROMPTS[2]], return_tensors="pt")  # the prompt whose sinks take almost all attention
    wide = copy.deepcopy(model).double()
    with torch.no_grad():
        with attnkit.attach(model, recipe):
            narrow_logits = model(**ids).logits
        with attnkit.attach(wide, recipe):
            wide_logits = wide(**ids).logits
    assert (narrow_logits.double() - wide_logits).abs().max() <= 1e-4
