"""attach() on every supported text family: no-op parity, exact undo, batched generate with left padding + cache."""

import pytest
import torch

import attnkit
from attnkit.interventions.noop import Noop
from attnkit.testing import TEXT_FAMILIES, tiny_causal_lm

HOOK_SETS = {
    "torch-path": ("query_scale", "score_bias", "edit_output"),  # runs on the fused SDPA backend
    "eager-path": ("edit_scores", "group_factors", "edit_probs"),  # forces the reference backend
    "grouped-path": ("query_scale", "group_factors", "edit_output"),  # exact group reweighting, no [Q,K] matrix
}


def _batch(pad: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :4] = 0  # left padding on sample 0
        mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("family", sorted(TEXT_FAMILIES))
@pytest.mark.parametrize("hooks", sorted(HOOK_SETS))
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "leftpad"])
def test_noop_forward_matches_stock(family, hooks, pad):
    model = tiny_causal_lm(family)
    ids, mask = _batch(pad)
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        with attnkit.attach(model, [Noop(hooks=HOOK_SETS[hooks])]) as handle:
            patched = model(ids, attention_mask=mask).logits
            report = handle.report()
        after = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (patched - stock)[real].abs().max().item() <= 1e-5
    assert torch.equal(after, stock), "remove() must restore bitwise-identical outputs"
    assert report["calls"]["noop"] == model.config.num_hidden_layers
    expected_backend = "torch" if hooks != "eager-path" and family != "gemma2" else "eager"
    assert {m["backend"] for m in report["modules"]} == {expected_backend}


@pytest.mark.parametrize("family", sorted(TEXT_FAMILIES))
def test_noop_generate_left_padding_kv_cache(family):
    model = tiny_causal_lm(family)
    ids, mask = _batch(pad=True)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
    with torch.no_grad():
        stock = model.generate(ids, **kwargs)
        with attnkit.attach(model, [Noop(hooks=("score_bias", "edit_probs"))]) as handle:
            patched = model.generate(ids, **kwargs)
            calls = handle.report()["calls"]["noop"]
    assert torch.equal(stock, patched)
    assert calls == model.config.num_hidden_layers * 6  # prefill + 5 decode steps, every layer


def test_attach_remove_restores_config_and_leaves_no_attributes():
    model = tiny_causal_lm("llama")
    before_impl = model.config._attn_implementation
    attrs_before = {name: set(vars(m)) for name, m in model.named_modules()}
    hooks_before = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    attention = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    handle = attnkit.attach(model, [Noop(layers=[1])])
    assert model.config._attn_implementation == before_impl  # the shared config is never changed
    assert all(m.config is not model.config and m.config._attn_implementation == "attnkit" for m in attention)
    handle.remove()
    handle.remove()  # idempotent
    assert model.config._attn_implementation == before_impl
    assert all(m.config is model.config for m in attention)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attrs_before
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks_before


def test_context_manager_removes_on_exception():
    model = tiny_causal_lm("qwen2")
    with pytest.raises(RuntimeError, match="boom"):
        with attnkit.attach(model, [Noop()]):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


class Halve(attnkit.Intervention):
    """Halves every head's output: a visible change to check disabled() and isolation."""

    name = "test-halve"

    def edit_output(self, out, ctx):
        return out * 0.5


def test_disabled_runs_stock_model_without_repatching():
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        stock = model(ids).logits
        with attnkit.attach(model, [Halve()]) as handle:
            changed = model(ids).logits
            with handle.disabled():
                assert model.model.layers[0].self_attn.config._attn_implementation == "attnkit"  # nothing re-patched
                inside = model(ids).logits
            again = model(ids).logits
    assert not torch.allclose(changed, stock, atol=1e-4)
    assert torch.equal(inside, stock)
    assert torch.equal(again, changed)


def test_two_models_with_different_recipes_do_not_interfere():
    a, b = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        stock = a(ids).logits
        with attnkit.attach(a, [Halve()]), attnkit.attach(b, [Noop()]):
            out_a, out_b = a(ids).logits, b(ids).logits
    assert not torch.allclose(out_a, stock, atol=1e-4)
    assert torch.allclose(out_b, stock, atol=1e-5)


def test_attaching_twice_raises_and_changes_nothing():
    model = tiny_causal_lm("llama")
    with attnkit.attach(model, [Noop()]):
        with pytest.raises(attnkit.AttachError, match="already attached"):
            attnkit.attach(model, [Halve()])
        with pytest.raises(attnkit.AttachError, match="appears twice"):
            attnkit.attach(tiny_causal_lm("llama"), [Noop(), Noop()])


@pytest.mark.parametrize(
    "target, message",
    [
        (dict(layers=[5]), r"layer 5 is out of range: this model has layers 0..1"),
        (dict(heads=[9]), r"head 9 is out of range: this model has heads 0..3"),
        (dict(layers="0-7"), r"out of range"),
        (dict(modules=r"no_such_module"), r"matched no attention module"),
    ],
)
def test_bad_targets_raise_with_valid_range_and_leave_model_untouched(target, message):
    model = tiny_causal_lm("llama")
    with pytest.raises(attnkit.AttachError, match=message):
        attnkit.attach(model, [Noop(**target)])
    assert model.config._attn_implementation == "sdpa"
    attnkit.attach(model, [Noop()]).remove()  # a failed attach leaves nothing behind that blocks a new one


def test_module_regex_and_head_targeting_only_touch_selected_heads():
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with attnkit.attach(model, [Halve(heads=[1])]) as handle, handle.capture(layers=[0], queries="all") as cap:
        model(ids)
    assert [m["module"] for m in handle.report()["modules"]] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with attnkit.attach(model, [Halve(modules=r"layers\.1\.")]) as handle:
        assert [m["layer"] for m in handle.report()["modules"]] == [1]
    assert cap.last(0).shape == (1, 4, 5, 5)


def test_idle_intervention_warns_once():
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[5, 6, 7]])
    with attnkit.attach(model, [Noop(layers=[1])]):
        model.config.num_hidden_layers = 1  # e.g. layer skipping: the targeted layer no longer runs
        with pytest.warns(RuntimeWarning, match="did not run"):
            model(ids)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(ids)  # only once
        model.config.num_hidden_layers = 2


def test_unsupported_objects_raise_naming_supported_families():
    with pytest.raises(NotImplementedError, match="llama"):
        attnkit.attach(torch.nn.Linear(2, 2), [])
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(NotImplementedError, match="does not route attention"):
        attnkit.attach(bloom, [])
