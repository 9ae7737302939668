"""AttentionContext.per_forward: shared by the layers of one forward, recomputed at the next one, and never shared by
a call whose keys differ (pruned cache, edited keys, a capture's rows); span group ids ride on it."""

import torch

from attnkit.interventions.base import AttentionContext
from attnkit.spans import SequenceTracker


def _tracker(n=4):
    tracker = SequenceTracker()
    tracker.observe(torch.tensor([list(range(1, n + 1))]), torch.tensor([[0] + [1] * (n - 1)]), past_length=0)
    return tracker


def _ctx(tracker, layer=0, k_len=None, **kw):
    k_len = k_len or tracker.length
    return AttentionContext(layer=layer, module=None, tracker=tracker, batch=1, num_heads=2, q_len=1, k_len=k_len,
                            causal=True, device=torch.device("cpu"), **kw)


def test_per_forward_shares_within_a_forward_and_recomputes_after():
    tracker, calls = _tracker(), []

    def compute():
        calls.append(1)
        return torch.tensor(float(len(calls)))

    first = [_ctx(tracker, layer).per_forward("x", compute) for layer in range(3)]
    assert [float(v) for v in first] == [1.0, 1.0, 1.0] and len(calls) == 1
    _ctx(tracker, k_len=2).per_forward("x", compute)  # a sliding-window layer sees other keys
    assert len(calls) == 2
    tracker.observe(torch.tensor([[9]]), torch.ones(1, 5, dtype=torch.long), past_length=4)  # next decode step
    assert float(_ctx(tracker).per_forward("x", compute)) == 3.0


def test_per_forward_is_not_shared_by_calls_with_other_keys():
    tracker, calls = _tracker(), []
    tracker.provide_key_positions([1], lambda: None)  # layer 1's cache may be pruned
    for ctx in (_ctx(tracker, layer=1), _ctx(tracker, orig_k_len=3), _ctx(tracker, query_rows=torch.tensor([0])),
                _ctx(tracker), _ctx(tracker, layer=2)):
        ctx.per_forward("x", lambda: calls.append(1))
    assert len(calls) == 4  # only the last two share


def test_group_ids_from_spans_match_per_layer_and_follow_the_keys():
    tracker = _tracker(5)
    ids = _ctx(tracker).group_ids(("first", "pad"))
    assert ids.tolist() == [[2, 1, 0, 0, 0]]
    assert _ctx(tracker, layer=3).group_ids(("first", "pad")) is ids  # one tensor for every layer of the forward
    assert _ctx(tracker, k_len=3).group_ids(("first", "pad")).tolist() == [[0, 0, 0]]  # the last 3 keys
    computed = _ctx(tracker).group_ids((lambda ctx: torch.tensor([[False, False, True, False, False]]),))
    assert computed.tolist() == [[0, 0, 1, 0, 0]]
