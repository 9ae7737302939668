"""Every preset of this package's LLM/VLM methods loads and attaches to a tiny model of its family; CLI."""

import pytest
import torch

import attnkit
from attnkit import cli
from attnkit.recipes import load_recipe
from attnkit.testing import tiny_causal_lm, tiny_vlm, vlm_inputs

LLM_PRESETS = ["noop", "act-llama", "streaming-llm", "head-temperature"]


@pytest.mark.parametrize("name", LLM_PRESETS)
def test_llm_presets_attach_and_run(name):
    model = tiny_causal_lm("llama", num_hidden_layers=4)
    ids = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    with attnkit.attach(model, name) as handle, torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        for iv in handle.interventions:
            if iv.capabilities():  # attention hooks: counted per call
                assert handle.report()["calls"][iv.name] > 0
            else:  # a KV-cache policy (streaming-llm) works through install(): it must have seen the cache
                assert iv.max_cache_seen > 0
    assert out.shape == (1, 13)


def test_var_auto_preset_on_tiny_vlm():
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=1)
    with attnkit.attach(model, "var-auto"), torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("name", ["var-llava", "var-qwen2-vl"])
def test_var_model_presets_load_and_refuse_wrong_models(name):
    (iv,) = load_recipe(name).build_interventions()
    assert iv.name == "var" and len(iv.sink_dims) == 2
    with pytest.raises(ValueError, match="exceed the hidden size"):
        attnkit.attach(tiny_vlm("llava"), name)


def test_cli_show_and_errors(capsys):
    assert cli.main(["show", "act-llama"]) == 0
    assert "method: act" in capsys.readouterr().out
    assert cli.main(["apply", "act-lama", "--model", "x", "--prompt", "hi"]) == 2
    assert "did you mean 'act-llama'" in capsys.readouterr().err
    table = cli._side_by_side("Paris.", "Paris, France.")
    assert "baseline" in table and "| Paris, France." in table


@pytest.mark.slow
def test_cli_apply_smollm2(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda path, image: (smollm2[0], smollm2[1], None))
    assert cli.main(["apply", "streaming-llm", "--model", "smollm2", "--prompt", "The capital of France is",
                     "--raw", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "intervened" in out and "Paris" in out
