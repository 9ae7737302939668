"""group_partials / combine_groups / biased_attention against the materialised fp64 reference."""

import math

import pytest
import torch

import kernel_ref as ref
from attnkit.kernels import grouped, masks
from attnkit.kernels.grouped import biased_attention, combine_groups, group_mass, group_partials

SCALE = 0.25
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}

# name -> (B, H, Hkv, Q, K, D, mask kwargs); kept small: the triton interpreter runs the same cases.
CASES = {
    "prefill": (1, 2, 2, 40, 40, 16, {}),
    "decode": (2, 2, 1, 1, 48, 16, {}),
    "chunked_prefill": (1, 2, 2, 13, 45, 16, {}),
    "gqa": (1, 2, 1, 24, 24, 32, {}),
    "left_padding": (2, 2, 1, 20, 20, 16, {"pad": (0, 7)}),
    "sink_window": (2, 2, 1, 36, 36, 16, {"window": 6, "num_sinks": 2, "pad": (0, 3)}),
    "non_causal": (1, 2, 2, 9, 20, 16, {"causal": False}),
}


def make_case(name, dtype=torch.float32, G=3, seed=0):
    B, H, Hkv, Q, K, D, kw = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, K, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, K, D, generator=gen).to(dtype)
    # contiguous spans with a scattered sink: [sink | text | image (with one sink inside) | text]
    key_group = torch.zeros(B, K, dtype=torch.long)
    key_group[:, 0] = 1
    key_group[:, K // 4: K // 2] = 2 if G > 2 else 0
    key_group[:, K // 3] = 1
    mask_kw = {k_: v_ for k_, v_ in kw.items() if k_ != "pad"}
    if "pad" in kw:  # left padding: sample b has pad[b] padded keys
        pad = torch.ones(B, K, dtype=torch.bool)
        for b, n in enumerate(kw["pad"]):
            pad[b, :n] = False
        mask_kw["key_padding"] = pad
    return q, k, v, key_group, mask_kw


def backends():
    from attnkit.kernels.triton import triton_available

    out = ["eager", "torch"]
    out.append("triton" if triton_available() else pytest.param("triton", marks=pytest.mark.skip("no triton")))
    return out


def run_partials(backend, q, k, v, key_group, G, **kw):
    if backend == "triton":
        from attnkit.kernels.triton import _flash

        return _flash.group_partials(q, k, v, key_group, G, scale=SCALE, block_m=16, block_n=16, **kw)
    return group_partials(q, k, v, key_group, G, scale=SCALE, backend=backend, **kw)


def run_biased(backend, q, k, v, key_group, bias, **kw):
    if backend == "triton":
        from attnkit.kernels.triton import _flash

        return _flash.biased_attention(q, k, v, key_group, bias, scale=SCALE, block_m=16, block_n=16, **kw)
    return biased_attention(q, k, v, key_group, bias, scale=SCALE, backend=backend, **kw)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", list(CASES))
def test_group_partials_match_reference(backend, case):
    q, k, v, key_group, kw = make_case(case)
    out_g, lse_g = run_partials(backend, q, k, v, key_group, 3, **kw)
    r_out, r_lse = ref.group_partials(q, k, v, key_group, 3, SCALE, **kw)
    assert out_g.shape == r_out.shape and out_g.dtype == torch.float32
    assert not torch.isnan(out_g).any() and not torch.isnan(lse_g).any()
    assert ref.rel_err(out_g, r_out) < 1e-5
    assert ref.rel_err(lse_g, r_lse) < 1e-5
    # recombined = plain attention
    assert ref.rel_err(combine_groups(out_g, lse_g), ref.attention(q, k, v, SCALE, **kw)) < 1e-5


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", ["prefill", "decode", "sink_window", "left_padding"])
def test_biased_attention_matches_reference(backend, case):
    q, k, v, key_group, kw = make_case(case)
    bias = torch.tensor([0.0, -1.5, 2.0]).view(1, 1, 3).repeat(1, q.shape[1], 1)  # [1,H,G]
    bias[0, -1] = torch.tensor([0.5, 1.0, -3.0])
    out = run_biased(backend, q, k, v, key_group, bias, **kw)
    per_key = bias.expand(q.shape[0], -1, -1).gather(2, key_group[:, None].expand(-1, q.shape[1], -1))
    assert out.dtype == q.dtype
    assert ref.rel_err(out, ref.attention(q, k, v, SCALE, per_key, **kw)) < 1e-5
    plain = run_biased(backend, q, k, v, key_group, None, **kw)
    assert ref.rel_err(plain, ref.attention(q, k, v, SCALE, **kw)) < 1e-5


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", ["prefill", "decode", "sink_window"])
def test_fp16(backend, case):
    q, k, v, key_group, kw = make_case(case, dtype=torch.float16)
    out_g, lse_g = run_partials(backend, q, k, v, key_group, 3, **kw)
    r_out, r_lse = ref.group_partials(q, k, v, key_group, 3, SCALE, **kw)
    assert ref.rel_err(out_g, r_out) < TOL[torch.float16]
    assert ref.rel_err(lse_g, r_lse) < TOL[torch.float16]
    out = run_biased(backend, q, k, v, key_group, None, **kw)
    assert out.dtype == torch.float16
    assert ref.rel_err(out, ref.attention(q, k, v, SCALE, **kw)) < TOL[torch.float16]


@pytest.mark.parametrize("backend", backends())
def test_bf16_runs_close(backend):
    q, k, v, key_group, kw = make_case("decode", dtype=torch.bfloat16)
    out = run_biased(backend, q, k, v, key_group, None, **kw)
    assert out.dtype == torch.bfloat16
    assert ref.rel_err(out, ref.attention(q, k, v, SCALE, **kw)) < 1e-2


@pytest.mark.parametrize("backend", backends())
def test_fully_padded_rows_give_zero_not_nan(backend):
    q, k, v, key_group, kw = make_case("left_padding")  # sample 1: first 7 keys padded
    out_g, lse_g = run_partials(backend, q, k, v, key_group, 3, **kw)
    out = combine_groups(out_g, lse_g)
    # sample 1, query rows at positions 0..6 see only padded keys
    assert torch.isneginf(lse_g[1, :, :7]).all()
    assert torch.equal(out[1, :, :7], torch.zeros_like(out[1, :, :7]))
    assert torch.equal(out_g[1, :, :7], torch.zeros_like(out_g[1, :, :7]))
    assert torch.isfinite(out).all()
    biased = run_biased(backend, q, k, v, key_group, None, **kw)
    assert torch.equal(biased[1, :, :7], torch.zeros_like(biased[1, :, :7]))
    assert torch.isfinite(biased).all()


@pytest.mark.parametrize("backend", backends())
def test_empty_group(backend):
    q, k, v, key_group, kw = make_case("prefill")
    out_g, lse_g = run_partials(backend, q, k, v, key_group, 4, **kw)  # group 3 has no keys
    assert torch.isneginf(lse_g[..., 3]).all()
    assert torch.equal(out_g[..., 3, :], torch.zeros_like(out_g[..., 3, :]))
    # group 2 is empty for rows before the image span starts (causal)
    assert torch.isneginf(lse_g[:, :, : 40 // 4, 2]).all()
    assert torch.isfinite(combine_groups(out_g, lse_g, torch.tensor([1.0, 0.5, 2.0, 3.0]))).all()


def test_scattered_sinks_inside_span_use_span_path(monkeypatch):
    """Many sinks scattered in an image block: still the span path, still exact."""
    q, k, v, key_group, kw = make_case("prefill")
    key_group[:, 12:30] = 2
    key_group[:, [0, 13, 17, 18, 25]] = 1  # BOS + scattered visual sinks (two adjacent)
    calls = {"span": 0}
    real = grouped._span_group_partials

    def spy(*a, **k_):
        calls["span"] += 1
        return real(*a, **k_)

    monkeypatch.setattr(grouped, "_span_group_partials", spy)
    out_g, lse_g = group_partials(q, k, v, key_group, 3, scale=SCALE)
    assert calls["span"] == 1
    r_out, r_lse = ref.group_partials(q, k, v, key_group, 3, SCALE)
    assert ref.rel_err(out_g, r_out) < 1e-5 and ref.rel_err(lse_g, r_lse) < 1e-5


@pytest.mark.parametrize("case", ["prefill", "left_padding", "chunked_prefill"])
def test_chunked_fallback_and_device_math(monkeypatch, case):
    """Force the general chunked path (many runs, tiny chunks) and the non-CPU span math."""
    q, k, v, _, kw = make_case(case)
    B, K = q.shape[0], k.shape[2]
    key_group = torch.randint(0, 3, (B, K), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(grouped, "MAX_SPAN_RUNS", 2)
    monkeypatch.setattr(masks, "CHUNK_ELEMENTS", 64)  # chunks of 16 queries
    r_out, r_lse = ref.group_partials(q, k, v, key_group, 3, SCALE, **kw)
    out_g, lse_g = group_partials(q, k, v, key_group, 3, scale=SCALE, **kw)
    assert ref.rel_err(out_g, r_out) < 1e-5 and ref.rel_err(lse_g, r_lse) < 1e-5
    monkeypatch.setattr(grouped, "MAX_SPAN_RUNS", 10_000)
    monkeypatch.setattr(grouped, "attention_lse", grouped._math_attention_lse)
    out_g, lse_g = group_partials(q, k, v, key_group, 3, scale=SCALE, **kw)
    assert ref.rel_err(out_g, r_out) < 1e-5 and ref.rel_err(lse_g, r_lse) < 1e-5


def row_case(row, sink_cols, extra_groups=None):
    """One decode query whose softmax over 6 keys is ``row`` (scores = log row), v = identity: output = probs."""
    row = torch.tensor(row, dtype=torch.float64)
    K, D = row.numel(), 16
    q = torch.zeros(1, 1, 1, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, K, D)
    k[0, 0, :, 0] = torch.log(row).float()  # scale 1: scores = log(row)
    v = torch.zeros(1, 1, K, D)
    v[0, 0, torch.arange(K), torch.arange(K)] = 1.0
    key_group = torch.zeros(1, K, dtype=torch.long)
    key_group[0, sink_cols] = 1
    for g, cols in (extra_groups or {}).items():
        key_group[0, cols] = g
    return q, k, v, key_group


@pytest.mark.parametrize("backend", backends())
def test_act_worked_example(backend):
    """METHODS.md §2: sinks ×β (β=0.4), the mass given back to the other keys in proportion."""
    q, k, v, key_group = row_case([0.30, 0.10, 0.10, 0.30, 0.10, 0.10], [3])
    if backend == "triton":
        from attnkit.kernels.triton import _flash

        out_g, lse_g = _flash.group_partials(q, k, v, key_group, 2, scale=1.0, block_m=16, block_n=16)
    else:
        out_g, lse_g = group_partials(q, k, v, key_group, 2, scale=1.0, backend=backend)
    M = group_mass(lse_g)  # [1,1,1,2]
    beta = 0.4
    factors = torch.stack([(M[..., 0] + (1 - beta) * M[..., 1]) / M[..., 0], torch.full_like(M[..., 1], beta)], -1)
    out = combine_groups(out_g, lse_g, factors)
    expect = torch.tensor([0.377143, 0.125714, 0.125714, 0.12, 0.125714, 0.125714])
    torch.testing.assert_close(out[0, 0, 0, :6], expect, atol=1e-6, rtol=0)
    torch.testing.assert_close(group_mass(lse_g)[0, 0, 0], torch.tensor([0.7, 0.3]), atol=1e-6, rtol=0)


def test_var_worked_example():
    """METHODS.md §1: sinks ×(1-p), the freed budget to visual non-sinks in proportion (p_paper = 0.4)."""
    # tokens [BOS(text sink), v1(visual sink), v2, v3, v4, t]; groups: 0 text, 1 sink, 2 visual non-sink
    q, k, v, key_group = row_case([0.40, 0.15, 0.15, 0.10, 0.05, 0.15], [0, 1], {2: [2, 3, 4]})
    out_g, lse_g = group_partials(q, k, v, key_group, 3, scale=1.0)
    M = group_mass(lse_g)  # [1,1,1,3]
    p = 0.4
    budget = p * M[..., 1]
    factors = torch.stack([torch.ones_like(budget), torch.full_like(budget, 1 - p), 1 + budget / M[..., 2]], -1)
    out = combine_groups(out_g, lse_g, factors)
    expect = torch.tensor([0.24, 0.09, 0.26, 0.173333, 0.086667, 0.15])
    torch.testing.assert_close(out[0, 0, 0, :6], expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", backends())
def test_group_bias_equals_factors_exp_bias(backend):
    q, k, v, key_group, kw = make_case("chunked_prefill")
    bias = torch.tensor([[[0.3, -2.0, 1.2], [0.0, 4.0, -0.7]]])  # [1,H,G]
    out_g, lse_g = run_partials(backend, q, k, v, key_group, 3, **kw)
    via_factors = combine_groups(out_g, lse_g, torch.exp(bias).unsqueeze(2))
    via_log = combine_groups(out_g, lse_g, log_factors=bias.unsqueeze(2))
    direct = run_biased(backend, q, k, v, key_group, bias, **kw)
    assert ref.rel_err(via_factors, direct) < 1e-5
    assert ref.rel_err(via_log, direct) < 1e-5


def test_combine_zero_factors_and_mass_edge_cases():
    out_g = torch.randn(1, 1, 2, 2, 4)
    lse_g = torch.tensor([[[[0.0, float("-inf")], [float("-inf"), float("-inf")]]]])
    out = combine_groups(out_g, lse_g, torch.tensor([0.0, 1.0]))  # only present group zeroed -> 0
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(group_mass(lse_g), torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]))
    assert combine_groups(out_g, lse_g, dtype=torch.float16).dtype == torch.float16


def test_bad_arguments():
    q, k, v, key_group, kw = make_case("prefill")
    with pytest.raises(ValueError, match="unknown backend"):
        group_partials(q, k, v, key_group, 3, scale=SCALE, backend="cuda-magic")
    with pytest.raises(ValueError, match="H % Hkv"):
        group_partials(q[:, :1], torch.randn(1, 2, 40, 16), v, key_group, 3, scale=SCALE)
    with pytest.raises(ValueError, match="key_group"):
        group_partials(q, k, v, key_group[:, :5], 3, scale=SCALE)
