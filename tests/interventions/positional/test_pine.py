"""PINE: the worked examples, prefill + decode equal to a literal reference (per query row and head: importance
without RoPE, explicit positions, RoPE applied by the model's own rotary module, visibility by position), invariance
of the output under permutations of the segments, and the ablation flags."""

import sys
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.interventions.positional.pine import PINE, importance_order, pine_inputs, reassigned_positions, \
    segment_ids, shifts_from_order, stacked_shift
from attnkit.testing import tiny_causal_lm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kvcache"))
from decode_reference import expand, reference_run, rope  # noqa: E402

NEG = float("-inf")


def test_worked_examples():
    # prefix P = 2, A (2), B (1), C (3): stacked A [6,7], B [7], C [5,6,7]
    assert reassigned_positions(2, [2, 1, 3], [0, 1, 2]) == [[6, 7], [5], [2, 3, 4]]  # segment-A query
    order = importance_order(torch.tensor([0.10, 0.35, 0.15]))  # suffix query: means A .10 B .35 C .15
    assert order.tolist() == [1, 2, 0]
    assert shifts_from_order(torch.tensor([2, 1, 3]), order).tolist() == [4, 0, 1]
    assert reassigned_positions(2, [2, 1, 3], order.tolist()) == [[2, 3], [7], [4, 5, 6]]
    # by sum C (0.45) would win; the code uses the mean
    assert importance_order(torch.tensor([0.0, 0.5, 0.2]), own=torch.tensor(0)).tolist() == [0, 1, 2]
    assert reassigned_positions(2, [2, 3], [0, 1]) == [[5, 6], [2, 3, 4]]  # two segments, X's queries
    assert reassigned_positions(2, [2, 3], [1, 0]) == [[2, 3], [4, 5, 6]]  # Y's queries
    assert stacked_shift([2, 1, 3]) == [4, 3, 0]
    assert importance_order(torch.tensor([0.2, 0.2, 0.1])).tolist() == [0, 1, 2]  # ties keep input order


def test_segment_ids_from_ranges_runs_and_split():
    assert segment_ids([[(1, 3), (3, 4)]], 1, 5).tolist() == [[0, 1, 1, 2, 0]]
    assert segment_ids(torch.tensor([[False, True, True, False, True]]), 1, 5).tolist() == [[0, 1, 1, 0, 2]]
    assert segment_ids([[(0, 5)]], 1, 5, split=3).tolist() == [[1, 1, 2, 3, 3]]


def pine_ref(rotary, P, lengths):
    """Literal PINE for one sample without padding: segments adjacent from P."""
    n, T = len(lengths), sum(lengths)
    starts = [P + sum(lengths[:k]) for k in range(n)]
    seg_of = {starts[k] + t: k for k in range(n) for t in range(lengths[k])}
    stacked = {starts[k] + t: P + T - lengths[k] + t for k in range(n) for t in range(lengths[k])}

    def key_positions(order, j_max):
        shift = shifts_from_order(torch.tensor(lengths), torch.tensor(order)).tolist()
        return [stacked[j] - shift[seg_of[j]] if j in seg_of else j for j in range(j_max)]

    def fn(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        H, Q, K = q.shape[1], q.shape[2], k.shape[2]
        kx, vx = expand(k, H), expand(v, H)
        region = list(range(P, P + T))
        outs = torch.zeros(1, Q, H, q.shape[-1])
        for r in range(Q):
            i = K - Q + r
            for h in range(H):
                if i < P:  # prefix: causal, original positions
                    pos_k, q_pos, visible = list(range(K)), i, [j <= i for j in range(K)]
                else:
                    raw = (kx[0, h, region] @ q[0, h, r]) * scaling  # no RoPE
                    if i in seg_of:
                        own = seg_of[i]
                        M = torch.zeros(n)
                        if n > 2:
                            for a in (x for x in region if seg_of[x] == own):
                                s = (kx[0, h, region] @ q[0, h, a - (K - Q)]) * scaling if a >= K - Q else None
                                s = s if s is not None else None
                                p = torch.softmax(s.masked_fill(torch.tensor([seg_of[x] == own for x in region]),
                                                                NEG), 0)
                                for kk in range(n):
                                    M[kk] += sum(float(p[x - P]) for x in region if seg_of[x] == kk) / lengths[kk]
                        M[own] = float("inf")
                        order = sorted(range(n), key=lambda kk: -M[kk])
                        pos_k, q_pos = key_positions(order, K), stacked[i]
                        visible = [pos_k[j] <= q_pos for j in range(K)]  # PINE's rule: by position
                    else:
                        p = torch.softmax(raw, 0)
                        means = [sum(float(p[x - P]) for x in region if seg_of[x] == kk) / lengths[kk]
                                 for kk in range(n)]
                        order = sorted(range(n), key=lambda kk: -means[kk])
                        pos_k, q_pos = key_positions(order, K), i
                        visible = [j <= i for j in range(K)]  # the model's causal mask
                qr = rope(rotary, q[:, h:h + 1, r:r + 1], torch.tensor([q_pos]))
                kr = rope(rotary, kx[:, h:h + 1], torch.tensor(pos_k))
                s = (kr[0, 0] @ qr[0, 0, 0]) * scaling
                p = torch.softmax(s.masked_fill(~torch.tensor(visible), NEG), 0)
                outs[0, r, h] = p @ vx[0, h]
        return outs, None

    return fn


@pytest.mark.parametrize("lengths", [[2, 1, 3], [2, 3]])
def test_prefill_and_decode_equal_the_literal_reference(lengths):
    model = tiny_causal_lm("llama")
    P, suffix = 3, 2
    ids = torch.arange(10, 10 + P + sum(lengths) + suffix)[None]
    ranges = [[(P + sum(lengths[:k]), P + sum(lengths[:k + 1])) for k in range(len(lengths))]]
    want, seq = reference_run(model, ids, pine_ref(model.model.rotary_emb, P, lengths), 3, raw_rope=True)
    for backend in ("torch", "eager"):
        with attnkit.attach(model, [PINE()], backend=backend) as handle, torch.no_grad():
            handle.set_span("pine_segments", ranges)
            out = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        got = torch.stack(out.logits)
        assert torch.allclose(got, want, atol=1e-4), (backend, (got - want).abs().max())
        assert torch.equal(out.sequences, seq)


def test_order_invariance():
    model = tiny_causal_lm("qwen2")
    prefix, segments, suffix = [3, 4, 5], [[10, 11], [12], [13, 14, 15], [16, 17]], [20, 21]
    outs = {}
    for name, perm in (("id", [0, 1, 2, 3]), ("rev", [3, 2, 1, 0]), ("mix", [2, 0, 3, 1])):
        segs = [segments[p] for p in perm]
        ids, ranges, at = list(prefix), [], len(prefix)
        for s in segs:
            ranges.append((at, at + len(s)))
            ids += s
            at += len(s)
        ids = torch.tensor([ids + suffix])
        with torch.no_grad():
            stock = model(ids).logits[0, -1]
            with attnkit.attach(model, [PINE()]) as handle:
                handle.set_span("pine_segments", [ranges])
                outs[name] = (model(ids).logits[0, -1], stock)
    for name in ("rev", "mix"):
        assert torch.allclose(outs[name][0], outs["id"][0], atol=1e-5), name
        assert not torch.allclose(outs[name][1], outs["id"][1], atol=1e-3)  # the stock model is order-dependent


def test_batched_with_padding_equals_alone_and_flags():
    model = tiny_causal_lm("llama")
    a = torch.arange(10, 22)[None]
    b = torch.arange(30, 39)[None]
    ranges_a, ranges_b = [(2, 4), (4, 5), (5, 8)], [(1, 3), (3, 6)]
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 12, [0] * 3 + [1] * 9])
    with torch.no_grad():
        with attnkit.attach(model, [PINE()]) as handle:
            handle.set_span("pine_segments", [ranges_a, [(s + 3, e + 3) for s, e in ranges_b]])
            batched = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
            handle.set_span("pine_segments", [ranges_a])
            alone_a = model(a).logits
            handle.set_span("pine_segments", [ranges_b])
            alone_b = model(b).logits
        assert torch.allclose(batched[0], alone_a[0], atol=1e-4)
        assert torch.allclose(batched[1, 3:], alone_b[0], atol=1e-4)
        stock = model(a).logits
        results = {}
        for kw in (dict(reposition=False), dict(bidirectional=False), {}):
            with attnkit.attach(model, [PINE(**kw)]) as handle:
                handle.set_span("pine_segments", [ranges_a])
                results[str(kw)] = model(a).logits
        assert not torch.allclose(results["{'reposition': False}"], stock, atol=1e-4)
        assert not torch.allclose(results["{'bidirectional': False}"], stock, atol=1e-4)
        assert torch.allclose(results["{'reposition': False}"][0, :2], stock[0, :2], atol=1e-5)  # prefix rows
    with pytest.raises(ValueError, match="nothing"):
        PINE(reposition=False, bidirectional=False)
    with attnkit.attach(model, [PINE()]), pytest.raises(KeyError, match="set_span"):
        model(a)


def test_pine_inputs_tokenise_segments_separately(smollm2):
    _, tok = smollm2
    ids, ranges = pine_inputs(tok, "Question: which?", [" A. red", " B. blue"], " Answer:")
    assert ranges[0][0][1] == ranges[0][1][0]  # adjacent
    assert tok.decode(ids[0, ranges[0][1][0]:ranges[0][1][1]]) == " B. blue"


@pytest.mark.parametrize("layers", [0, "1", "0-1", [-1], None])
def test_every_layer_spec_form_attaches(layers):
    """A single int, a range string, negatives or nothing: PINE resolves the spec like every target (found by the
    recipe fuzz on hypothesis 6.100: ``layers: 0`` raised TypeError inside attach)."""
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        stock = model(ids).logits
        with attnkit.attach(model, [PINE(layers=layers)]) as handle:
            handle.set_span("pine_segments", [[(1, 3), (3, 5)]])
            changed = model(ids).logits
    assert torch.isfinite(changed).all() and not torch.allclose(changed, stock, atol=1e-6)
