"""The fast CPU paths of issue #17 against the fp64 reference: one fused call for per-key biases, the segment
plan of the span decomposition (column masks over gaps, gathered tiny groups, pieces combined without a
``[B,H,Q,G,D]`` buffer), GQA K/V read in place, the decode reweighting from unnormalised sums, and the structured
key-mass pass in several chunks. fp32 relative error ≤ 1e-5 everywhere (issue: results must not change)."""

import pytest
import torch

import kernel_ref as ref
from test_kernels_grouped import SCALE, make_case
from attnkit.kernels import grouped, segments, stats
from attnkit.kernels.grouped import combine_groups, fused_key_bias, group_mass, group_partials, row_reweight
from attnkit.kernels.masks import KeyMask

TOL = 1e-5


def _inputs(B, H, Hkv, Q, K, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Q, D, generator=gen), torch.randn(B, Hkv, K, D, generator=gen),
            torch.randn(B, Hkv, K, D, generator=gen))


def _padding(B, K, pads):
    pad = torch.ones(B, K, dtype=torch.bool)
    for b, n in enumerate(pads):
        pad[b, :n] = False
    return pad


# ---- one fused call for a per-key bias ---------------------------------------------------------------------------
@pytest.mark.parametrize("Q,K", [(40, 40), (13, 45), (1, 48), (3, 30)], ids=["prefill", "chunked", "decode", "rows"])
@pytest.mark.parametrize("Hkv", [2, 1], ids=["mha", "gqa"])
def test_fused_key_bias_matches_reference(Q, K, Hkv):
    B, H = 2, 2
    q, k, v = _inputs(B, H, Hkv, Q, K)
    pad = _padding(B, K, (0, 5))
    bias = torch.randn(B, 1, 1, K, generator=torch.Generator().manual_seed(3))  # [B,1,1,K] like PASTA's
    out = fused_key_bias(q, k, v, KeyMask.build(Q, K, key_padding=pad), bias, scale=SCALE)
    want = ref.attention(q, k, v, SCALE, bias[:, :, 0].expand(B, H, K), key_padding=pad)
    assert out is not None and out.dtype == q.dtype
    assert ref.rel_err(out, want) < TOL


def test_fused_key_bias_rows_with_every_key_biased_away_give_zero():
    """-inf biases (FastV-style dropped keys) that leave a row nothing: 0, never NaN; per-head biases too."""
    B, H, Q, K = 1, 2, 12, 12
    q, k, v = _inputs(B, H, H, Q, K)
    bias = torch.zeros(1, H, 1, K)
    bias[0, 0, 0, :4] = float("-inf")  # head 0: rows 0..3 see only dropped keys
    bias[0, 1, 0, 6] = float("-inf")
    out = fused_key_bias(q, k, v, KeyMask.build(Q, K), bias, scale=SCALE)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 0, :4], torch.zeros_like(out[0, 0, :4]))
    finite = torch.where(torch.isinf(bias), -1e30, bias)[:, :, 0]
    want = ref.attention(q, k, v, SCALE, finite)
    assert ref.rel_err(out[0, 0, 4:], want[0, 0, 4:]) < TOL and ref.rel_err(out[0, 1], want[0, 1]) < TOL


def test_fused_key_bias_declines_what_it_cannot_do():
    q, k, v = _inputs(1, 2, 2, 8, 8)
    per_query = torch.randn(1, 1, 8, 8)
    assert fused_key_bias(q, k, v, KeyMask.build(8, 8), per_query, scale=SCALE) is None  # varies per query
    assert fused_key_bias(q, k, v, KeyMask.build(8, 8, window=3), None, scale=SCALE) is None  # a window
    explicit = torch.ones(8, 8, dtype=torch.bool)  # bidirectional: not the structured form
    assert fused_key_bias(q, k, v, KeyMask.build(8, 8, mask=explicit), None, scale=SCALE) is None


# ---- the segment plan ------------------------------------------------------------------------------------------
def test_plan_merges_runs_across_short_gaps_and_gathers_tiny_groups():
    runs = [(0, 1, 1), (1, 40, 0), (40, 41, 1), (41, 90, 2), (90, 91, 1), (91, 99, 2), (99, 300, 0)]
    plan = segments.plan_segments(runs, 300)
    got = {(s.group, s.start, s.end, s.holes) for s in plan.segments}
    assert got == {(0, 1, 40, 0), (2, 41, 99, 1), (0, 99, 300, 0)}  # text runs 59 apart: separate segments
    assert plan.explicit[1].tolist() == [0, 40, 90]
    image = next(s for s in plan.segments if s.group == 2)
    assert image.member.tolist().count(False) == 1 and not image.member[90 - 41]


LAYOUTS = ["scattered_sinks", "alternating_blocks", "one_group", "many_tiny_groups", "segment_and_tiny_run"]


def _layout(layout: str, B: int, K: int) -> tuple[torch.Tensor, int]:
    """Group ids ``[B, K]`` and the number of groups for a key layout."""
    groups = torch.zeros(B, K, dtype=torch.long)
    G = 3
    if layout == "scattered_sinks":
        groups[:, K // 4: 3 * K // 4] = 2
        groups[:, [0, K // 3, K // 3 + 1, K // 2]] = 1
    elif layout == "alternating_blocks":
        for start in range(0, K, 10):
            groups[:, start:start + 5] = 1 + (start // 10) % 2
    elif layout == "many_tiny_groups":  # ACT: one group per sink pattern, one to three keys each
        G = 6
        for g, cols in enumerate([[0], [3, 4], [K // 3], [K // 2, K // 2 + 2], [K - 2]], start=1):
            groups[:, cols] = g
    elif layout == "segment_and_tiny_run":  # group 2: a long segment and one far key (merged into its partials)
        groups[:, 2:K // 2] = 2
        groups[:, K - 3] = 2
        groups[:, 1] = 1
    return groups, G


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["prefill", "chunked_prefill", "gqa", "left_padding"])
def test_span_path_matches_reference_for_layouts(case, layout):
    q, k, v, _, kw = make_case(case)
    groups, G = _layout(layout, q.shape[0], k.shape[2])
    runs = grouped.group_runs(groups, kw.get("key_padding"))
    out_g, lse_g = grouped._span_group_partials(q, k, v, runs, G, scale=SCALE, causal=kw.get("causal", True))
    r_out, r_lse = ref.group_partials(q, k, v, groups, G, SCALE, **kw)
    assert ref.rel_err(out_g, r_out) < TOL and ref.rel_err(lse_g, r_lse) < TOL
    pieces, lse_p = grouped._span_group_partials(q, k, v, runs, G, scale=SCALE, causal=kw.get("causal", True),
                                                 materialise=False)
    factors = torch.rand(*lse_p.shape, generator=torch.Generator().manual_seed(5)) + 0.1
    assert ref.rel_err(combine_groups(pieces, lse_p, factors), combine_groups(r_out, r_lse, factors.double())) < TOL


@pytest.mark.parametrize("case", ["prefill", "chunked_prefill", "gqa", "left_padding"])
def test_pieces_combine_equals_the_materialised_partials(case):
    """materialise=False (what the runtime and the benchmark use) gives the same combination, without the buffer."""
    q, k, v, groups, kw = make_case(case)
    groups[:, 5:9] = 2  # a short image-like run too
    factors = torch.rand(q.shape[0], q.shape[1], q.shape[2], 3, generator=torch.Generator().manual_seed(2)) + 0.1
    pieces, lse_p = group_partials(q, k, v, groups, 3, scale=SCALE, materialise=False, **kw)
    out_g, lse_g = group_partials(q, k, v, groups, 3, scale=SCALE, **kw)
    assert isinstance(pieces, segments.GroupPieces)
    torch.testing.assert_close(lse_p, lse_g, rtol=0, atol=0)
    assert ref.rel_err(combine_groups(pieces, lse_p, factors), combine_groups(out_g, lse_g, factors)) < TOL
    r_out, r_lse = ref.group_partials(q, k, v, groups, 3, SCALE, **kw)
    assert ref.rel_err(combine_groups(pieces, lse_p, factors), combine_groups(r_out, r_lse, factors.double())) < TOL


def test_pieces_merge_overlapping_partials():
    pieces = segments.GroupPieces(1, 1, 1, 4, 1, "cpu")
    pieces.add(0, 0, 0, 3, torch.tensor([[[1.0], [1.0], [1.0]]]), torch.zeros(1, 3))
    pieces.add(0, 0, 2, 4, torch.tensor([[[3.0], [5.0]]]), torch.zeros(1, 2))  # row 2 merged, row 3 fresh
    out = pieces.out_g()[0, 0, :, 0, 0]
    assert out.tolist() == [1.0, 1.0, 2.0, 5.0]
    torch.testing.assert_close(pieces.lse_g()[0, 0, :, 0], torch.tensor([0.0, 0.0, 0.6931472, 0.0]))


def test_gqa_kv_are_not_copied_per_query_head(monkeypatch):
    """Where the fused CPU kernel reads GQA K/V in place (torch 2.13; probed by ``native_gqa``) K/V are never
    copied per query head; on older torch (2.7 refuses fewer K/V heads) the copy is the fallback, and the result is
    the same either way."""
    import packaging.version

    native = segments.native_gqa()
    if packaging.version.parse(torch.__version__.split("+")[0]) >= packaging.version.parse("2.13"):
        assert native, "torch >= 2.13 takes GQA K/V in the fused CPU kernel: the probe must find it"
    q, k, v, groups, kw = make_case("gqa")
    expected_out, expected_lse = group_partials(q, k, v, groups, 3, scale=SCALE)
    calls = []
    copy = segments.expand_kv
    monkeypatch.setattr(segments, "expand_kv", lambda x, H: calls.append(1) or copy(x, H))
    out, lse = group_partials(q, k, v, groups, 3, scale=SCALE)
    fused_key_bias(q, k, v, KeyMask.build(q.shape[2], k.shape[2]), None, scale=SCALE)
    assert bool(calls) == (not native)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)


# ---- decode: reweighting from unnormalised sums ------------------------------------------------------------------
@pytest.mark.parametrize("case", ["decode", "left_padding", "sink_window", "gqa"])
def test_row_reweight_equals_combine_groups(case):
    q, k, v, groups, kw = make_case(case)
    q = q[:, :, -2:]  # two decode rows
    keys = KeyMask.build(2, k.shape[2], **kw)
    sums = grouped.row_sums(q, k, v, groups, 3, keys, scale=SCALE)
    out_g, lse_g = grouped._row_group_partials(q, k, v, groups, 3, keys, scale=SCALE)
    factors = torch.rand(*sums.mass.shape, generator=torch.Generator().manual_seed(1)) + 0.1
    want = combine_groups(out_g, lse_g, factors)
    assert ref.rel_err(row_reweight(sums, factors), want) < TOL
    torch.testing.assert_close(sums.mass, group_mass(lse_g), rtol=0, atol=1e-6)
    r_out, r_lse = ref.group_partials(q, k, v, groups, 3, SCALE, **kw)
    assert ref.rel_err(want, combine_groups(r_out, r_lse, factors.double())) < TOL


# ---- key mass in several chunks ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["prefill", "chunked_prefill", "gqa", "left_padding", "non_causal"])
def test_structured_key_mass_in_many_chunks(case, monkeypatch):
    monkeypatch.setattr(stats, "_mass_chunk", lambda B, H, K: 5)
    q, k, _, _, kw = make_case(case)
    B, Q = q.shape[0], q.shape[2]
    p = ref.probs(q, k, SCALE, **kw)
    assert ref.rel_err(stats.key_mass(q, k, scale=SCALE, **kw), p.sum(2)) < TOL
    select = torch.zeros(B, Q, dtype=torch.bool)
    select[:, 3:9] = True
    select[0, -1] = True
    assert ref.rel_err(stats.key_mass(q, k, scale=SCALE, query_select=select, **kw),
                       (p * select[:, None, :, None]).sum(2)) < TOL
