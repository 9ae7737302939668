"""DuoAttention: the worked examples (binarisation, windows, loss, schedule), decoding equal to a literal reference,
a chunked prefill equal to feeding the chunks one call at a time, and the gate calibration's two-stream forward."""

import pytest
import torch

import attnkit
from attnkit.hooks.compat import cache_kwargs, output_cache
from decode_reference import attnkit_run, duo_ref, reference_run
from attnkit.interventions.kvcache.duo import DuoAttention, _GatedStreams, binarise, chunked_allowed, deploy_allowed, \
    duo_calibrate, duo_loss, full_kv_heads, lambda_allowed, load_duo_gates, lr_multiplier
from attnkit.scores import HeadScores
from attnkit.testing import tiny_causal_lm

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25]])


def test_worked_examples():
    g = torch.tensor([[0.9, 0.2, 0.55, 0.4]])
    assert binarise(g, 0.5).flatten().tolist() == [True, False, True, False]
    assert binarise(g, 0.75).flatten().tolist() == [True, False, False, False]
    assert not binarise(g, 1.0).any() and binarise(g, 0.0).all()
    assert abs(float(duo_loss(torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[1.5, 1.0]]]), torch.tensor([[1]]),
                              torch.tensor([1, 0.5, 0.2, 0]), 0.05)) - 0.64625) < 1e-6
    assert [lr_multiplier(s, 2000) for s in (0, 199, 399, 1000, 1700, 1999)] == [0.1, 0.5, 1, 1, 0.75, 0.1]
    ten = torch.ones(1, 10, dtype=torch.bool)
    assert lambda_allowed(ten, 1, 2, 3)[0, 0].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert deploy_allowed(ten[:, :9], 1, 2, 3)[0, 0].nonzero().flatten().tolist() == [0, 1, 5, 6, 7, 8]
    assert deploy_allowed(ten, 1, 2, 3)[0, 0].nonzero().flatten().tolist() == [0, 1, 6, 7, 8, 9]
    assert chunked_allowed(ten[:, :8], 4, 2, 3)[0, 7].nonzero().flatten().tolist() == list(range(8))
    # left padding: sinks are the first real tokens, the window counts real tokens
    padded = torch.tensor([[False, False] + [True] * 8])
    assert deploy_allowed(padded, 1, 2, 3)[0, 0].nonzero().flatten().tolist() == [2, 3, 6, 7, 8, 9]


def test_gates_files_and_selection():
    gates = HeadScores(torch.tensor([[0.9, 0.9, 0.2, 0.2], [0.55, 0.55, 0.4, 0.4]]), params={"kv_group": 2})
    assert full_kv_heads(gates, 0.5) == {0: [0], 1: [0]}
    assert full_kv_heads(gates, None, threshold=0.5) == {0: [0], 1: [0]}


def test_released_tsv(tmp_path):
    path = tmp_path / "full_attention_heads.tsv"
    path.write_text("0.9\t0.2\n0.55\t0.4\n")
    gates = load_duo_gates(path, num_heads=4)
    assert gates.scores.tolist() == [[0.9, 0.9, 0.2, 0.2], [0.55, 0.55, 0.4, 0.4]] or \
        torch.allclose(gates.scores, torch.tensor([[0.9, 0.9, 0.2, 0.2], [0.55, 0.55, 0.4, 0.4]]))


def test_decoding_equals_the_literal_reference():
    model = tiny_causal_lm("llama")
    want, seq = reference_run(model, IDS, duo_ref({0: {0}}, 2, 2, 3), 5)
    for backend in ("torch", "eager"):
        got, got_seq = attnkit_run(model, IDS, DuoAttention({0: [0]}, sinks=2, recent=3), 5, backend)
        assert torch.allclose(got, want, atol=1e-4), (backend, (got - want).abs().max())
    stock, _ = reference_run(model, IDS, duo_ref({0: {0, 1}, 1: {0, 1}}, 2, 2, 3), 5)
    assert not torch.allclose(want[1:], stock[1:], atol=1e-3)


def test_chunked_prefill_equals_feeding_chunks():
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        with attnkit.attach(model, [DuoAttention({1: [1]}, sinks=1, recent=2, prefill="chunked", chunk=4)]):
            one_call = model(IDS).logits
        with attnkit.attach(model, [DuoAttention({1: [1]}, sinks=1, recent=2)]):
            cache, parts = None, []
            for c0 in range(0, IDS.shape[1], 4):
                mask = torch.ones(1, c0 + 4, dtype=torch.long)
                out = model(IDS[:, c0:c0 + 4], attention_mask=mask, **cache_kwargs(model, cache))
                cache = output_cache(out)
                parts.append(out.logits)
    assert torch.allclose(one_call, torch.cat(parts, 1), atol=1e-5)


def test_two_stream_forward_neutral_and_streaming():
    model = tiny_causal_lm("llama")
    ids = IDS.repeat(2, 1)
    with torch.no_grad():
        ones = torch.nn.Parameter(torch.ones(2, 2))
        with attnkit.attach(model, [_GatedStreams(ones, 2, 1, 3)]):
            h = model.model(input_ids=ids).last_hidden_state
        assert torch.allclose(h[0], h[1], atol=1e-5)  # gates 1: the gated stream is the reference
        zeros = torch.nn.Parameter(torch.zeros(2, 2))
        with attnkit.attach(model, [_GatedStreams(zeros, 2, 1, 3)]):
            h = model.model(input_ids=ids).last_hidden_state
        with attnkit.attach(model, [DuoAttention({}, sinks=1, recent=3, prefill="lambda")]):
            streaming = model.model(input_ids=IDS).last_hidden_state
        assert torch.allclose(h[1], streaming[0], atol=1e-5)  # gates 0: every head streams under the Λ mask
        assert torch.allclose(h[0], model.model(input_ids=IDS).last_hidden_state[0], atol=1e-5)


def test_calibration_moves_gates_and_records_losses():
    model = tiny_causal_lm("llama")
    labels = IDS.clone()
    labels[:, :8] = -100
    gates = duo_calibrate(model, None, steps=6, lr=0.05, reg=0.5, sinks=1, recent=2, samples=[(IDS, labels)])
    assert gates.scores.shape == (2, 4) and gates.params["kv_group"] == 2
    assert len(gates.params["losses"]) == 6 and float(gates.scores.max()) < 1.0  # the L1 term pulls gates down
    assert all(p.requires_grad for p in model.parameters())  # the model is given back trainable as it was
    assert torch.equal(gates.scores[:, 0], gates.scores[:, 1])  # one gate per KV head


def test_refusals():
    with pytest.raises(ValueError, match="prefill"):
        DuoAttention(prefill="half")
    with pytest.raises(attnkit.AttachError, match="full head"):
        attnkit.attach(tiny_causal_lm("llama"), [DuoAttention({0: [0, 1], 1: [0, 1]})])


def test_sliding_layers_are_neither_gated_nor_restricted():
    model = tiny_causal_lm("gemma3_text", num_hidden_layers=6)  # layer 5 attends globally, 0-4 slide
    gates = duo_calibrate(model, None, steps=2, sinks=1, recent=2, samples=[(IDS, IDS)])
    assert gates.params["layers"] == [5]
    assert torch.equal(gates.scores[:5], torch.ones(5, 4))  # never optimised
    duo = DuoAttention(gates, sparsity=0.5)
    with attnkit.attach(model, [duo]) as handle:
        assert [s.layer for s in handle._planned] == [5] or handle._planned == []


@pytest.mark.parametrize("bad", [[None], {0: None}, {"a": [1]}, 3])
def test_malformed_full_heads_is_one_sentence_naming_the_field(bad):
    """Found by the recipe fuzz test: ``full_heads: [null]`` in a recipe raised AttributeError at attach."""
    with pytest.raises(ValueError, match=r"duo-attention: full_heads must be gates .* got "):
        DuoAttention(full_heads=bad)
    assert DuoAttention(full_heads={"0": ["1"]}).full_heads == {0: [1]}
