"""What the kvcache methods share: the account of attended keys, and for every method: decoding a left-padded batch
equals decoding each sample alone, and the fused backend equals the eager reference at decode steps."""

import pytest
import torch

import attnkit
from decode_reference import attnkit_run
from attnkit.interventions.kvcache._sparse import KeyAccount, rope_positions
from attnkit.interventions.kvcache.duo import DuoAttention
from attnkit.interventions.kvcache.long_heads import LongHeads
from attnkit.interventions.kvcache.moa import MoA
from attnkit.interventions.kvcache.razor import RazorAttention
from attnkit.interventions.kvcache.recycled import Recycled
from attnkit.interventions.kvcache.tidal_decode import TidalDecode
from attnkit.interventions.kvcache.token_select import TokenSelect
from attnkit.testing import tiny_causal_lm

METHODS = {
    "tidal": lambda: TidalDecode(top_k=3, sparse_layer_start=0, correction_layer=5),
    "recycled": lambda: Recycled(budget=0.3, stride=2, similarity=0.99, kernel=3),
    "token-select": lambda: TokenSelect(n_init=1, n_local=3, top_k=3, prefill_chunk=3),
    "long-heads": lambda: LongHeads(window_size=2, atten_length=8, begin_selective_length=64),
    "razor": lambda: RazorAttention(retrieval_heads={0: [0]}, sinks=1, capacity=5),
    "razor-paper": lambda: RazorAttention(retrieval_heads={0: [0]}, sinks=1, buffer="paper", paper_min_recent=3,
                                          paper_ratio=4, compensation_weight="count", recompress_every_step=True),
    "duo": lambda: DuoAttention({0: [0]}, sinks=1, recent=3),
    "moa": lambda: MoA(spans={0: [(1.0, 0.2), None, (2.0, 0.0)], 1: [(0.0, 0.3)]}, sinks=1),
}
LONG = [1, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31]
SHORT = [1, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]


def test_account():
    acc = KeyAccount()
    keep = torch.tensor([[[[1, 0, 1, 0]], [[1, 1, 1, 1]]]], dtype=torch.bool)
    acc.add(0, keep, torch.tensor([[[[1, 1, 1, 0]]]], dtype=torch.bool), heads=torch.tensor([True, False]))
    assert acc.fraction() == 2 / 3  # head 1 is not a target head; key 3 is not visible
    acc.add(1, None, torch.ones(1, 1, 2, 4, dtype=torch.bool), rows=torch.tensor([[True, False]]),
            extra=torch.tensor([1.0]))
    assert acc.summary()["per_layer"] == {0: 2 / 3, 1: 5 / 4}
    assert rope_positions(torch.tensor([[False, True, True]])).tolist() == [[0, 0, 1]]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_batched_decode_equals_each_sample_alone(method):
    model = tiny_causal_lm("qwen2")
    pad = len(LONG) - len(SHORT)
    ids = torch.tensor([LONG, [0] * pad + SHORT])
    mask = torch.tensor([[1] * len(LONG), [0] * pad + [1] * len(SHORT)])
    batched, _ = attnkit_run(model, ids, METHODS[method](), 4, attention_mask=mask)
    for b, sample in enumerate((LONG, SHORT)):
        alone, _ = attnkit_run(model, torch.tensor([sample]), METHODS[method](), 4)
        assert torch.allclose(batched[:, b], alone[:, 0], atol=1e-4), (method, b, (batched[:, b] - alone[:, 0]).abs().max())
    stock, _ = attnkit_run(model, ids, TidalDecode(top_k=10_000, sparse_layer_start=0), 4, attention_mask=mask)
    assert not torch.allclose(batched[1:], stock[1:], atol=1e-4), "the method changes decoding"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fused_decode_equals_eager(method):
    model = tiny_causal_lm("llama")
    ids = torch.tensor([LONG])
    fused, _ = attnkit_run(model, ids, METHODS[method](), 4, backend="torch")
    eager, _ = attnkit_run(model, ids, METHODS[method](), 4, backend="eager")
    assert torch.allclose(fused, eager, atol=1e-4)


def test_gemma3_sliding_layers_are_left_alone():
    with pytest.raises(attnkit.AttachError, match="sliding window"):  # the tiny 2-layer Gemma-3 is all sliding
        attnkit.attach(tiny_causal_lm("gemma3_text"), [TokenSelect(n_local=512)])
    model = tiny_causal_lm("gemma3_text", num_hidden_layers=6)
    layer_types = model.config.layer_types
    assert "full_attention" in layer_types
    for iv in (TokenSelect(n_init=1, n_local=2, top_k=1, prefill_chunk=2), LongHeads(window_size=1, atten_length=4)):
        with attnkit.attach(model, [iv]) as handle:
            planned = sorted({s.layer for s in handle._planned})
        assert planned == [i for i, t in enumerate(layer_types) if t != "sliding_attention"]
