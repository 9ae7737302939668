"""attnkit.api: the handle's lifecycle and the guarantees that are not per-method (the conformance suite in
tests/conformance runs the per-method ones over every registered intervention and family)."""

import copy
import gc
import weakref

import pytest
import torch

import attnkit
from attnkit.interventions.noop import Noop
from attnkit.testing import tiny_causal_lm, tiny_denoiser, tiny_sd_pipeline, tiny_vlm, vlm_inputs


class Halve(attnkit.Intervention):
    """Halves every head's output: a visible change."""

    name = "test-api-halve"

    def edit_output(self, out, ctx):
        return out * 0.5


IDS = torch.tensor([[5, 6, 7, 8, 9]])


def test_an_attached_model_that_is_dropped_is_freed():
    model = tiny_causal_lm("llama")
    attnkit.attach(model, [Halve()])  # the handle is not kept: the model keeps it alive while it lives
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_handle_dropped_while_its_model_lives_keeps_intervening():
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        stock = model(IDS).logits
        attnkit.attach(model, [Halve()])
        gc.collect()
        assert not torch.allclose(model(IDS).logits, stock, atol=1e-4)


def test_a_removed_handle_cannot_be_reentered():
    model = tiny_causal_lm("llama")
    handle = attnkit.attach(model, [Halve()])
    handle.remove()
    with pytest.raises(attnkit.AttachError, match="was removed"):
        with handle:
            pass
    with pytest.raises(attnkit.AttachError, match="was removed"):
        handle.capture(layers=[0])


def test_one_instance_is_refused_on_a_second_live_attachment_and_free_after_remove():
    a, b = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    halve = Halve()
    with torch.no_grad():
        stock_b = b(IDS).logits
        with attnkit.attach(a, [halve]):
            with pytest.raises(attnkit.AttachError, match="already attached.*another instance"):
                attnkit.attach(b, [halve])
            assert torch.equal(b(IDS).logits, stock_b)  # nothing half-applied on b
            with attnkit.attach(b, [copy.deepcopy(halve)]):  # a second instance works
                assert not torch.allclose(b(IDS).logits, stock_b, atol=1e-4)
        with attnkit.attach(b, [halve]):  # free again once its handle is removed
            assert not torch.allclose(b(IDS).logits, stock_b, atol=1e-4)


@pytest.mark.parametrize("outer_first", [True, False])
def test_overlapping_attachments_are_refused(outer_first):
    model = tiny_causal_lm("llama")
    outer, inner = (model, model.model) if outer_first else (model.model, model)
    with torch.no_grad():
        stock = model(IDS).logits
        with attnkit.attach(outer, [Halve()]):
            changed = model(IDS).logits
            with pytest.raises(attnkit.AttachError, match="already attached"):
                attnkit.attach(inner, [Noop()])
            assert torch.equal(model(IDS).logits, changed)  # the first attachment still runs
        assert torch.equal(model(IDS).logits, stock)


def test_overlapping_pipeline_attachments_are_refused():
    pipe = tiny_sd_pipeline()
    with attnkit.attach(pipe, [Noop()]):
        with pytest.raises(attnkit.AttachError, match="already attached"):
            attnkit.attach(pipe.unet, [Noop()])
    with attnkit.attach(pipe.unet, [Noop()]):
        with pytest.raises(attnkit.AttachError, match="already attached"):
            attnkit.attach(pipe, [Noop()])


def test_a_failed_forward_leaves_the_handle_usable():
    model = tiny_causal_lm("llama")
    with torch.no_grad(), attnkit.attach(model, [Halve()]) as handle:
        want = model(IDS).logits
        with pytest.raises(IndexError):
            model(torch.tensor([[5, 6, 10_000]]))  # a token id outside the vocabulary
        assert torch.equal(model(IDS).logits, want)
        generated = model.generate(IDS, max_new_tokens=3, do_sample=False)
        assert handle.tracker.length == IDS.shape[1] + 2


def test_an_interrupt_during_generate_leaves_the_handle_usable():
    model = tiny_causal_lm("llama")
    layer = model.model.layers[1]
    calls = {"n": 0}

    def interrupt_on_third_call(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    with torch.no_grad(), attnkit.attach(model, [Halve()]):
        want = model.generate(IDS, max_new_tokens=4, do_sample=False)
        hook = layer.register_forward_pre_hook(interrupt_on_third_call)
        with pytest.raises(KeyboardInterrupt):
            model.generate(IDS, max_new_tokens=4, do_sample=False)
        hook.remove()
        assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False), want)


def test_deepcopy_while_attached_runs_stock_and_shared_configs_stay_correct():
    model = tiny_causal_lm("llama")
    twin = tiny_causal_lm("llama")
    twin.config = model.config  # two models sharing one config object
    for module in twin.modules():
        if hasattr(module, "config"):
            module.config = model.config
    with torch.no_grad():
        stock = model(IDS).logits
        handle = attnkit.attach(model, [Halve()])
        copied = copy.deepcopy(model)
        assert torch.allclose(copied(IDS).logits, stock, atol=1e-6)  # a copy is a stock model (causal)
        assert torch.allclose(twin(IDS).logits, stock, atol=1e-6)  # the config's other user is untouched
        other = attnkit.attach(twin, [Noop()])
        handle.remove()
        other.remove()
        assert torch.equal(model(IDS).logits, stock) and torch.allclose(twin(IDS).logits, stock, atol=1e-6)
        assert torch.allclose(copied(IDS).logits, stock, atol=1e-6)
        with attnkit.attach(copied, [Halve()]):  # the copy can be attached on its own
            assert not torch.allclose(copied(IDS).logits, stock, atol=1e-4)
        assert torch.allclose(copied(IDS).logits, stock, atol=1e-6)


@pytest.mark.parametrize("preset", ["fastv", "visual-exit", "cmai", "vtc-cls", "paint", "damro"])
def test_vision_presets_refuse_a_text_model(preset):
    model = tiny_causal_lm("llama", num_hidden_layers=4)
    with torch.no_grad():
        stock = model(IDS).logits
    with pytest.raises(attnkit.AttachError, match="needs .*image tokens|needs .*vision tower"):
        attnkit.attach(model, preset)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, stock)


@pytest.mark.parametrize("preset", ["act-llama", "pasta", "streaming-llm", "head-temperature", "kv-retention"])
def test_llm_presets_refuse_a_pipeline(preset):
    with pytest.raises(attnkit.AttachError, match="needs a transformers language model"):
        attnkit.attach(tiny_denoiser("unet"), preset)


def test_diffusion_presets_refuse_a_language_model():
    with pytest.raises(attnkit.AttachError, match="needs a diffusers denoiser"):
        attnkit.attach(tiny_causal_lm("llama"), "pag-sd")


def test_vlm_attach_reaches_text_and_vision_stacks_and_restores_them():
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=1)
    with torch.no_grad():
        stock = model(**inputs).logits
        with attnkit.attach(model, [Noop()]) as handle, handle.capture(layers=[0], component="vision") as cap:
            during = model(**inputs).logits
        assert cap.last(0).shape[-1] == cap.last(0).shape[-2] or cap.last(0).shape[-2] == 1
        assert torch.allclose(during, stock, atol=1e-5) and torch.equal(model(**inputs).logits, stock)


def test_auto_warns_when_a_layer_needs_the_materialised_matrix():
    from attnkit.interventions.steering.cmai import CMAI

    model = tiny_vlm("llava")
    with pytest.warns(attnkit.MaterialisedAttentionWarning, match=r"cmai .*eager backend on layers \[1\]"):
        attnkit.attach(model, [CMAI(layers=[1])]).remove()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", attnkit.MaterialisedAttentionWarning)
        attnkit.attach(model, [Halve()]).remove()  # fused: no warning
        attnkit.attach(model, [CMAI(layers=[1])], backend="eager").remove()  # asked for: no warning


def test_save_writes_the_recipe_next_to_a_checkpoint_and_attach_reads_it_back(tmp_path):
    from attnkit.interventions.steering.pasta import Pasta

    model = tiny_causal_lm("llama")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        with attnkit.attach(model, [Pasta(alpha=0.1, layers=[1], heads=[0, 2]),
                                    Noop(layers=[0], hooks=("query_scale",))]) as handle:
            handle.set_span("emphasis", [[(1, 3)]])
            want = model(ids).logits
            path = handle.save(tmp_path / "checkpoint")
        assert path.name == "attnkit_recipe.yaml"
        with attnkit.attach(model, str(tmp_path / "checkpoint")) as again:
            again.set_span("emphasis", [[(1, 3)]])
            assert [iv.name for iv in again.interventions] == ["pasta", "noop"]
            assert again.interventions[1].config() == {"layers": [0], "hooks": ["query_scale"]}
            got = model(ids).logits
    assert torch.equal(got, want)
    with attnkit.attach(tiny_causal_lm("llama", num_hidden_layers=4), "act-llama") as handle:  # a preset
        text = handle.save(tmp_path / "preset").read_text()
    assert "name: act-llama" in text and "method: act" in text  # the recipe itself is written


def test_save_refuses_values_without_a_yaml_form(tmp_path):
    from attnkit.interventions.steering.pasta import Pasta

    model = tiny_causal_lm("llama")
    with attnkit.attach(model, [Pasta(alpha=torch.tensor(0.1))]) as handle:
        with pytest.raises(attnkit.RecipeError, match=r"interventions\[0\] \(pasta\).*no YAML form"):
            handle.save(tmp_path)


def test_a_second_recipe_on_one_model_is_refused_with_how_to_compose():
    model = tiny_causal_lm("llama")
    with attnkit.attach(model, "noop"):
        with pytest.raises(attnkit.AttachError, match="attach one recipe holding all interventions"):
            attnkit.attach(model, "head-temperature")
