"""RazorAttention: echo/induction scores against the materialised attention map, the worked examples (scoring,
selection, compensation, cache layout), and decoding equal to a literal reference of the vendor cell."""

import pytest
import torch

import attnkit
from decode_reference import attnkit_run, razor_ref, reference_run
from attnkit.interventions.kvcache._sparse import gathered_attention
from attnkit.interventions.kvcache.razor import RazorAttention, compressed_layout, diagonal_scores, pooled_top, \
    razor_head_scores, razor_retrieval_heads, repeated_random_tokens, row_logsumexp
from attnkit.scores import HeadScores
from attnkit.testing import tiny_causal_lm

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25]])


def literal_scores(A: torch.Tensor, period: int):
    """echo/induction of one head from its full causal map A [T, T] (start token at 0), by the definition."""
    n = A.shape[0] - 1
    echo, induction = [], []
    for i in range(period, n):
        copies = [j for j in range(i) if j % period == i % period]
        echo.append(sum(float(A[i + 1, j + 1]) for j in copies))
        induction.append(sum(float(A[i + 1, j + 2]) for j in copies))
    return sum(echo) / len(echo), sum(induction) / len(induction)


def test_worked_example_uniform_head():
    q, k = torch.zeros(1, 10, 4), torch.randn(1, 10, 4)  # P = 3, 3 repeats + start token; uniform attention
    echo, induction = diagonal_scores(q, k, row_logsumexp(q, k, 1.0), 3, 1.0)
    assert abs(float(echo) - 0.196958) < 1e-6 and abs(float(induction) - 0.196958) < 1e-6


def test_scores_equal_the_materialised_map():
    torch.manual_seed(0)
    q, k = torch.randn(2, 13, 8), torch.randn(2, 13, 8)  # P = 4, 3 repeats
    echo, induction = diagonal_scores(q, k, row_logsumexp(q, k, 0.5, chunk=5), 4, 0.5)
    causal = torch.ones(13, 13).tril().bool()
    A = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(~causal, float("-inf")), -1)
    for h in range(2):
        e, i = literal_scores(A[h], 4)
        assert abs(float(echo[h]) - e) < 1e-5 and abs(float(induction[h]) - i) < 1e-5
    assert torch.allclose(row_logsumexp(q, k, 0.5), row_logsumexp(q, k, 0.5, softcap=1e9), atol=1e-4)


def test_head_scores_on_a_model_equal_its_captured_maps():
    model = tiny_causal_lm("llama")
    echo, induction = razor_head_scores(model, period=5, repeats=3, low=10, high=60, seed=3, start_token=1)
    ids = repeated_random_tokens(5, 3, 10, 60, 3, 1)
    assert ids.shape == (1, 16) and torch.equal(ids[0, 1:6], ids[0, 6:11])
    with attnkit.attach(model, []) as h, h.capture(queries="all") as cap, torch.no_grad():
        model(ids)
    for layer in range(2):
        for head in range(4):
            e, i = literal_scores(cap.last(layer)[0, head], 5)
            assert abs(float(echo.scores[layer, head]) - e) < 1e-5
            assert abs(float(induction.scores[layer, head]) - i) < 1e-5
    assert echo.params["seed"] == 3 and echo.params["num_kv_heads"] == 2


def test_worked_example_selection():
    induction = HeadScores(torch.tensor([[0.10, 0.40, 0.05, 0.02], [0.30, 0.01, 0.20, 0.60]]))
    echo = HeadScores(torch.tensor([[0.02, 0.0, 0.09, 0.0], [0.01, 0.0, 0.03, 0.0]]))
    picked = razor_retrieval_heads(echo, induction, num_kv_heads=2, induction_ratio=0.5, echo_ratio=0.25)
    assert picked.layer_heads() == {0: [0, 1, 2, 3], 1: [2, 3]}  # L0 {KV0, KV1}, L1 {KV1}
    assert pooled_top(torch.tensor([[0.5, 0.5], [0.5, 0.1]]), 0.25).sum() == 3  # ties at the boundary admitted
    assert pooled_top(torch.tensor([[0.5, 0.1]]), 0.2).sum() == 0  # round(0.4) = 0


def test_worked_example_compensation_and_layout():
    q = torch.tensor([1.0, 1.0]).view(1, 1, 1, 2)
    k = torch.tensor([[0.5, 0.5], [0.0, 0.0]]).view(1, 1, 2, 2)
    v = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    allowed = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    paper = gathered_attention(q, k, v, allowed, scaling=1.0, bias=torch.tensor([torch.log(torch.tensor(2.0)), 0]))
    assert torch.allclose(paper.flatten(), torch.tensor([0.844638, 0.844638]), atol=1e-6)
    exact = gathered_attention(q, torch.tensor([[1.0, 0], [0, 1], [0, 0]]).view(1, 1, 3, 2),
                               torch.tensor([[2.0, 0], [0, 2], [0, 0]]).view(1, 1, 3, 2),
                               torch.ones(1, 1, 1, 3, dtype=torch.bool), scaling=1.0)
    assert torch.allclose(paper, exact, atol=1e-6)
    vendor = gathered_attention(q, k, v, allowed, scaling=1.0)
    assert torch.allclose(vendor.flatten(), torch.tensor([0.731059, 0.731059]), atol=1e-6)
    s, d, r = compressed_layout(300, 4, 256)
    assert (list(s), d.start, d.stop, r.start, r.stop) == ([0, 1, 2, 3], 4, 49, 49, 300)
    assert compressed_layout(256, 4, 256)[1] == range(0, 0)  # n <= capacity: nothing folded
    s, d, r = compressed_layout(300, 4, 256, virtual=False)
    assert len(d) == 0 and len(r) == 252


@pytest.mark.parametrize("count", [False, True])
def test_decoding_equals_the_literal_reference(count):
    model = tiny_causal_lm("llama")
    kw = dict(retrieval_heads={1: [2]}, sinks=2, capacity=6, compensation_weight="count" if count else "none")
    want, seq = reference_run(model, IDS, razor_ref({1: {1}}, 2, 2, 6, count=count), 4)
    for backend in ("torch", "eager"):
        got, got_seq = attnkit_run(model, IDS, RazorAttention(**kw), 4, backend)
        assert torch.allclose(got, want, atol=1e-4), (backend, (got - want).abs().max())
    stock, _ = reference_run(model, IDS, razor_ref({}, 2, 2, 1000), 4)
    assert not torch.allclose(want[1:], stock[1:], atol=1e-3)


def test_fraction_and_refusals():
    model = tiny_causal_lm("llama")
    razor = RazorAttention(retrieval_heads={0: [0, 1]}, sinks=4, capacity=256)
    with attnkit.attach(model, [razor]):
        assert razor.kv_fraction(256) == 1.0
        # 4 KV heads, 3 compressed: 1000-token prompt keeps 256 of 1000 on them
        assert abs(razor.kv_fraction(1000) - (1000 + 3 * 256) / 4000) < 1e-9
    with pytest.raises(attnkit.AttachError, match="every KV head"):
        attnkit.attach(model, [RazorAttention(retrieval_heads={0: [0, 2], 1: [1, 3]})])
    with pytest.raises(ValueError, match="compensation_weight"):
        RazorAttention(compensation_weight="paper")
    with pytest.raises(ValueError, match="selection"):
        attnkit.attach(model, [RazorAttention(retrieval_heads=HeadScores(torch.zeros(2, 4)))])
