"""Every preset of this package's LLM/VLM methods loads and attaches to a tiny model of its family; CLI."""

import pytest
import torch

import attnkit
from attnkit import cli
from attnkit.hooks.compat import model_from_config
from attnkit.recipes import load_recipe
from attnkit.testing import tiny_causal_lm, tiny_vlm, vlm_inputs

LLM_PRESETS = ["noop", "act-llama", "streaming-llm", "streaming-llm-ppl", "head-temperature"]


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


def test_act_presets_follow_the_released_layer_ranges():
    """Llama: range(2, 31) on 32 layers (2..L-2); Mistral: range(2, 32) (2..L-1, the last layer included)."""
    model = tiny_causal_lm("mistral", num_hidden_layers=6)
    for name, layers in (("act-llama", [2, 3, 4]), ("act-mistral", [2, 3, 4, 5])):
        with attnkit.attach(model, name) as handle:
            assert [m["layer"] for m in handle.report()["modules"]] == layers, name
            (iv,) = handle.interventions
            assert (iv.beta, iv.sink_test, iv.theta, iv.drop_first) == (0.4, "code", 0.1, "detected")


def test_streaming_presets_pair_window_and_eviction_as_the_released_scripts():
    (chat,) = load_recipe("streaming-llm").build_interventions()
    (ppl,) = load_recipe("streaming-llm-ppl").build_interventions()
    assert (chat.num_sinks, chat.window, chat.evict, chat.reserve, chat.pos_shift) == (4, 2000, "per_prompt", 1000,
                                                                                       True)
    assert (ppl.num_sinks, ppl.window, ppl.evict, ppl.pos_shift) == (4, 255, "per_call", True)


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


def _wide_llava():
    """A 4-layer LLaVA whose residual stream is wide enough (2560) for LLaMA-2-7B's sink dimensions."""
    import transformers

    text = dict(model_type="llama", vocab_size=128, hidden_size=2560, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=20, num_key_value_heads=20, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_id=120,
                                      vision_feature_layer=-1)
    torch.manual_seed(0)
    return model_from_config(transformers.LlavaForConditionalGeneration, config, attn_implementation="sdpa").eval()


def test_var_llava_preset_runs_on_a_model_of_the_right_width():
    model = _wide_llava()
    inputs = vlm_inputs("llava", model, batch=2, left_pad=2)
    dims = [1415, 2533]
    with torch.no_grad():
        stock = model(**inputs).logits
        embed = model.get_input_embeddings().weight
        embed[:, dims] = 0.0
        embed[inputs["input_ids"][0, 2], dims] = 400.0  # a token with a massive activation in the sink dimensions
        with attnkit.attach(model, "var-llava") as handle:
            out = model(**inputs).logits
            calls = handle.report()["calls"]["var"]
    assert calls > 0 and torch.isfinite(out).all()
    assert out.shape == stock.shape
