"""Vision-language families: no-op parity, spans (image tokens) per sample through left padding and decoding."""

import pytest
import torch

import attnkit
from attnkit.hooks.compat import cache_kwargs, output_cache
from attnkit.interventions.noop import Noop
from attnkit.testing import VISION_FAMILIES, tiny_vlm, vlm_inputs


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_vlm_noop_forward_and_generate_match_stock(family):
    model = tiny_vlm(family)
    inputs = vlm_inputs(family, model, batch=2, left_pad=3)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        stock = model(**inputs).logits
        stock_tokens = model.generate(**inputs, **gen)
        with attnkit.attach(model, [Noop(hooks=("score_bias", "group_factors"))]) as handle:
            patched = model(**inputs).logits
            patched_tokens = model.generate(**inputs, **gen)
            modules = [m["module"] for m in handle.report()["modules"]]
        after = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (patched - stock)[real].abs().max() <= 1e-5
    assert torch.equal(stock_tokens, patched_tokens)
    assert torch.equal(after, stock)
    assert len(modules) == model.config.get_text_config().num_hidden_layers  # text layers only by default


class RecordSpans(attnkit.Intervention):
    """Records what an intervention sees of the spans at every call (test probe)."""

    name = "test-record-spans"

    def __init__(self, **target):
        super().__init__(**target)
        self.seen = []

    def edit_output(self, out, ctx):
        self.seen.append({
            "k_len": ctx.k_len, "prefill": ctx.is_prefill,
            "image": ctx.key_mask("image").cpu(), "first": ctx.key_mask("first").cpu(),
            "response": ctx.key_mask("response").cpu(), "pad": ctx.key_mask("pad").cpu(),
            "q_response": ctx.query_mask("response").cpu(),
        })
        return out


def test_image_spans_follow_left_padding_and_decode_steps():
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=2, left_pad=3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    probe = RecordSpans(layers=[0])
    with torch.no_grad(), attnkit.attach(model, [probe]):
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(probe.seen) == 3 and probe.seen[0]["prefill"] and not probe.seen[1]["prefill"]
    prefill, last = probe.seen[0], probe.seen[-1]
    expected_image = (ids == model.config.image_token_id) & mask.bool()
    assert torch.equal(prefill["image"], expected_image)
    first_real = mask.argmax(dim=1)
    assert prefill["first"].nonzero()[:, 1].tolist() == first_real.tolist()
    # after two decode steps the keys grew by two, image positions unchanged, new keys are "response"
    assert last["k_len"] == ids.shape[1] + 2
    assert torch.equal(last["image"][:, : ids.shape[1]], expected_image)
    assert last["response"][:, -2:].all() and not last["response"][:, : ids.shape[1]].any()
    assert last["q_response"].all()
    assert torch.equal(last["pad"][:, : ids.shape[1]], ~mask.bool())


def test_user_spans_batch_and_errors():
    from attnkit.testing import tiny_causal_lm

    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 100, (2, 6))
    probe = RecordSpans(layers=[1])
    with attnkit.attach(model, [probe]) as handle:
        handle.set_span("instruction", [[(1, 3)], [(4, 6)]])
        model(ids)
        handle.set_span("bad", torch.zeros(3, 6, dtype=torch.bool))
        with pytest.raises(ValueError, match="span 'bad' has shape"):
            model(ids)
    handle.tracker.clear_spans()
    tracker = handle.tracker
    tracker.set_span("instruction", [[(1, 3)], [(4, 6)]])
    tracker.observe(ids, None, 0)
    assert tracker.mask("instruction").int().tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="reserved"):
        handle.set_span("image", [[(0, 1)], [(0, 1)]])


def test_spans_follow_kept_tokens_after_fastv_pruning():
    from attnkit.interventions.pruning.fastv import FastV

    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=2, left_pad=2)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    probe = RecordSpans(layers=[1])
    fastv = FastV(k=1, ratio=0.5)
    with torch.no_grad(), attnkit.attach(model, [fastv, probe]):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    prefill, decode = probe.seen[0], probe.seen[-1]
    n_img = int((ids[0] == model.config.image_token_id).sum())
    kept_images = prefill["image"].sum(dim=1)
    assert kept_images.tolist() == [n_img - n_img // 2] * 2  # half of each sample's image tokens survive
    assert prefill["k_len"] < ids.shape[1]  # a real shorter sequence in layer 1
    assert torch.equal(decode["image"][:, : prefill["k_len"]], prefill["image"])
    assert decode["response"][:, -1].all() and not decode["response"][:, :-1].any()


def test_attaching_after_the_prefill_treats_the_next_call_as_decode():
    from attnkit.testing import tiny_causal_lm

    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        out = model(ids, use_cache=True)  # prefill without attnkit
        probe = RecordSpans(layers=[0])
        with attnkit.attach(model, [probe]):
            model(ids[:, :1], **cache_kwargs(model, output_cache(out)))
    (seen,) = probe.seen
    assert not seen["prefill"] and seen["k_len"] == 7
    assert seen["response"][:, -1].all() and not seen["response"][:, :-1].any()
