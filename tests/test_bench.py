"""``attnkit bench``: the cost table auto reads (both device types, with where each was measured) and the per-layer
explanation of a recipe, including what it says about a CUDA device."""

from attnkit.bench import costs_text, explain_recipe, main
from attnkit.kernels.backends import COSTS
from attnkit.testing import tiny_causal_lm


def test_costs_name_where_each_table_was_measured():
    text = costs_text()
    assert "cpu (B=1, H=8, D=64, fp32, N=2048" in text and "cuda (NVIDIA H200" in text
    for device, table in COSTS.items():
        for backend, costs in table.items():
            assert f"    {backend:<7} " + ", ".join(f"{k} {v:g}" for k, v in costs.items()) in text
    assert "not measured yet" not in text


def test_explains_auto_on_cuda_from_the_h200_costs(monkeypatch):
    from attnkit.api import get_intervention
    from attnkit.kernels.backends import BACKENDS

    for name in BACKENDS:  # this CPU machine has none of the GPU backends: make them all available
        monkeypatch.setattr(BACKENDS.get(name), "available", lambda device_type: None)
    rows = explain_recipe(tiny_causal_lm("llama"), [get_intervention("act")(beta=0.4)], device="cuda")
    assert {r["chosen"] for r in rows} == {"triton"}
    assert rows[0]["why"] == "cheapest measured (~7.85× SDPA)"


def test_cli_prints_the_costs_and_refuses_an_unknown_recipe(capsys):
    assert main(["--costs"]) == 0
    assert "cuda (NVIDIA H200" in capsys.readouterr().out
    assert main(["--recipe", "no-such-preset", "--model", "tiny-llama"]) == 2
    assert "no-such-preset" in capsys.readouterr().err
