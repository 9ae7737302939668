"""attnkit.hooks.compat: the one module that knows transformers' private and renamed names."""

import pytest
import torch
import transformers
from packaging.version import Version

import attnkit
from attnkit.hooks import compat
from attnkit.interventions.steering.pasta import Pasta
from attnkit.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama")


def test_cache_kwarg_is_the_name_the_installed_release_takes(model):
    expected = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"
    assert compat.cache_kwarg(model) == expected
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 7]]), use_cache=True)
        cache = compat.output_cache(out)
        assert cache is not None and cache.get_seq_length() == 3
        model(torch.tensor([[9]]), **compat.cache_kwargs(model, cache))
    assert cache.get_seq_length() == 4  # the cache was really used, not dropped into **kwargs


def test_cache_from_kwargs_reads_every_spelling():
    marker = object()
    for name in compat.CACHE_KWARGS:
        assert compat.cache_from_kwargs({name: marker}) is marker
    assert compat.cache_from_kwargs({"past_key_values": None}) is None


def test_past_length_from_the_mask_and_the_cache(model):
    with torch.no_grad():
        cache = compat.output_cache(model(torch.tensor([[1, 5, 7]]), use_cache=True))
    assert compat.past_length({"attention_mask": torch.ones(2, 9)}, new_len=9) == 0
    assert compat.past_length({"attention_mask": torch.ones(1, 4), "cache": cache}, new_len=1) == 3
    assert compat.past_length({"past_key_values": cache}, new_len=1) == 3  # no mask: the cache says
    assert compat.past_length({"past_key_values": cache}, new_len=1, tracked=10) == 10  # pruned cache, tracked
    # a mask that is longer than the cache is fine (pruned / evicting caches hold fewer slots than tokens seen)
    assert compat.past_length({"attention_mask": torch.ones(1, 8), "cache": cache}, new_len=1) == 7


@pytest.mark.parametrize("mask_len, use_cache", [(1, True), (6, False), (3, True)])
def test_past_length_refuses_a_mask_that_disagrees_with_the_cache(model, mask_len, use_cache):
    with torch.no_grad():
        cache = compat.output_cache(model(torch.tensor([[1, 5, 7, 8]]), use_cache=True))  # 4 cached tokens
    kwargs = {"attention_mask": torch.ones(1, mask_len)}
    if use_cache:
        kwargs["cache"] = cache
    with pytest.raises(compat.CacheMismatchError, match="attention_mask"):
        compat.past_length(kwargs, new_len=1)


def test_attn_implementation_round_trip(model):
    config = model.config
    before = compat.attn_implementation(config)
    compat.set_attn_implementation(config, "eager")
    assert compat.attn_implementation(config) == "eager"
    compat.set_attn_implementation(config, before)
    assert compat.attn_implementation(config) == before
    assert compat.supports_attention_interface(model)
    assert compat.model_eager_function(model.model.layers[0].self_attn) is not None


def _left_padded():
    ids = torch.tensor([[0, 0, 1, 9, 5, 7, 3, 8], [1, 6, 4, 9, 5, 7, 3, 2]])
    mask = (ids != 0).long()
    spans = [[(3, 5)], [(3, 5)]]  # the same two tokens "9 5" in both samples
    return ids, mask, spans


def test_generate_left_padded_span_recipe_sees_every_decode_step(model):
    """The span-aware recipe must see decode steps as decode steps (5.24 passes the cache as ``cache=``): the
    tracker grows by one token per step and batched generation equals each sample generated alone."""
    ids, mask, spans = _left_padded()
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), attnkit.attach(model, [Pasta(alpha=0.01, layers=[0, 1], heads=[0, 3])]) as handle:
        handle.set_span("emphasis", spans)
        batched = model.generate(input_ids=ids, attention_mask=mask, **gen)
        assert handle.tracker.length == ids.shape[1] + 3 and not handle.tracker.last_was_prefill
        assert handle.tracker.mask("emphasis")[:, 3:5].all() and handle.tracker.mask("emphasis").sum() == 4
        for b in range(2):
            start = int((mask[b] == 0).sum())
            handle.set_span("emphasis", [[(s - start, e - start) for s, e in spans[b]]])
            alone = model.generate(input_ids=ids[b:b + 1, start:], **gen)
            assert torch.equal(alone.sequences[0, -4:], batched.sequences[b, -4:])
            for step_alone, step_batched in zip(alone.scores, batched.scores):
                assert torch.allclose(step_alone[0], step_batched[b], atol=1e-4)


def test_manual_decode_with_either_cache_spelling_matches_generate(model):
    ids, mask, spans = _left_padded()
    with torch.no_grad(), attnkit.attach(model, [Pasta(alpha=0.01, layers=[0, 1])]) as handle:
        handle.set_span("emphasis", spans)
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True).scores
        for name in ("cache", "past_key_values"):
            if name == "cache" and compat.cache_kwarg(model) != "cache":
                continue  # releases before 5.24 do not take cache=
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            step_mask, logits = mask, [out.logits[:, -1]]
            for _ in range(2):
                nxt = logits[-1].argmax(-1, keepdim=True)  # [B, 1]
                step_mask = torch.cat([step_mask, torch.ones_like(nxt)], 1)
                out = model(input_ids=nxt, attention_mask=step_mask, use_cache=True, **{name: compat.output_cache(out)})
                logits.append(out.logits[:, -1])
            for got, ref in zip(logits, want):
                assert torch.allclose(got, ref, atol=1e-4)


def test_a_mismatched_call_raises_and_leaves_the_handle_usable(model):
    ids, mask, spans = _left_padded()
    with torch.no_grad(), attnkit.attach(model, [Pasta(alpha=0.01, layers=[0])]) as handle:
        handle.set_span("emphasis", spans)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        with pytest.raises(compat.CacheMismatchError):
            model(input_ids=ids[:, :1], attention_mask=mask[:, :1], **compat.cache_kwargs(model, compat.output_cache(out)))
        again = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(again, out.logits, atol=1e-6)
