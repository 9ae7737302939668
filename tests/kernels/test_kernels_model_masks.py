"""Fused kernels under the mask the model actually builds: bidirectional image blocks, prefix LM, chunked attention,
sliding windows and left padding, as bool or additive float masks, against a materialised fp64 reference.

Before the kernels took the model's mask they rebuilt "causal + padding (+ window)" themselves, so every case here
except ``left_padding`` and ``sliding_padded`` failed for the torch and triton paths.
"""

import pytest
import torch

import kernel_ref as ref
from test_kernels_grouped import backends
from attnkit.kernels import grouped
from attnkit.kernels.grouped import biased_attention, combine_groups, group_partials, masked_attention
from attnkit.kernels.masks import KeyMask, recognise
from attnkit.kernels.stats import attention_rows, key_mass

SCALE = 0.3
B, H, HKV, N, D = 2, 4, 2, 24, 16
PADS = (0, 5)  # left padding per sample: sample 1 has 5 pad slots


def loops_mask(kind: str, n: int = N, pads=PADS) -> torch.Tensor:
    """``[B,1,N,N]`` bool built with explicit loops over the definition of each mask family (slow, obviously right)."""
    ok = torch.zeros(len(pads), 1, n, n, dtype=torch.bool)
    for b, pad in enumerate(pads):
        image = set(range(pad + 3, pad + 11))  # one image block of 8 tokens after 3 text tokens
        for i in range(n):
            for j in range(n):
                if j < pad or i < pad:
                    continue  # padded key, or a padded query row (no allowed key at all)
                causal = j <= i
                if kind == "left_padding":
                    good = causal
                elif kind == "sliding_padded":
                    good = causal and i - j < 6
                elif kind == "bidirectional_blocks":  # Gemma3: image tokens see their whole block
                    good = causal or (i in image and j in image)
                elif kind == "bidirectional_sliding":  # Gemma3 sliding layer: AND(window, OR(causal, block))
                    good = (causal or (i in image and j in image)) and abs(i - j) < 6
                elif kind == "prefix_lm":  # PaliGemma-style: the prefix (first 7 real tokens) is bidirectional
                    good = causal or (j < pad + 7 and i < pad + 7)
                elif kind == "chunked":  # Llama-4-style chunked attention, chunks of 5 real tokens
                    good = causal and (i - pad) // 5 == (j - pad) // 5
                else:
                    raise KeyError(kind)
                ok[b, 0, i, j] = good
    return ok


KINDS = ["left_padding", "sliding_padded", "bidirectional_blocks", "bidirectional_sliding", "prefix_lm", "chunked"]
STRUCTURED = {"left_padding": None, "sliding_padded": 6}  # kinds that are "causal & padding (& window)"


def inputs(dtype=torch.float32, seed=0, q_len=N):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, q_len, D, generator=g).to(dtype)
    k = torch.randn(B, HKV, N, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, N, D, generator=g).to(dtype)
    groups = torch.zeros(B, N, dtype=torch.long)
    groups[:, [0, 6]] = 1  # scattered sinks
    groups[1, 5] = 1  # sample 1's first real token
    groups[:, 8:16] = 2  # an image span
    return q, k, v, groups


def as_float(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """transformers' eager_mask form: 0 where allowed, finfo.min elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def reference(q, k, v, allowed, groups=None, G=3, bias=None):
    """fp64 (out_g [B,H,Q,G,D], lse_g [B,H,Q,G], plain out [B,H,Q,D], probs [B,H,Q,K]) under ``allowed [B,1|H,Q,K]``."""
    s = ref.scores(q, k, 1.0) * SCALE
    if bias is not None:
        s = s + bias.double()
    vv = v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)

    def soft(ok):
        t = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(t, -1)
        return torch.nan_to_num(torch.exp(t - lse.unsqueeze(-1)), nan=0.0), lse

    probs, _ = soft(allowed)
    if groups is None:
        return None, None, probs @ vv, probs
    outs, lses = [], []
    for g in range(G):
        p, lse = soft(allowed & (groups == g)[:, None, None, :])
        outs.append(p @ vv)
        lses.append(lse)
    return torch.stack(outs, 3), torch.stack(lses, 3), probs @ vv, probs


def real_rows(allowed):
    """``[B,1|H,Q]`` rows with at least one allowed key (padded query rows have none)."""
    return allowed.any(-1)


def run_partials(backend, q, k, v, groups, mask, **kw):
    if backend == "triton":
        from attnkit.kernels.triton import _flash

        return _flash.group_partials(q, k, v, groups, 3, scale=SCALE, mask=mask, block_m=16, block_n=16, **kw)
    return group_partials(q, k, v, groups, 3, scale=SCALE, mask=mask, backend=backend, **kw)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("form", ["bool", "float"])
@pytest.mark.parametrize("kind", KINDS)
def test_group_partials_follow_the_model_mask(backend, form, kind):
    q, k, v, groups = inputs()
    allowed = loops_mask(kind)
    mask = allowed if form == "bool" else as_float(allowed)
    out_g, lse_g = run_partials(backend, q, k, v, groups, mask, causal=True, window=STRUCTURED.get(kind))
    r_out, r_lse, r_plain, _ = reference(q, k, v, allowed, groups)
    assert torch.isfinite(out_g).all() and not torch.isnan(lse_g).any()
    assert ref.rel_err(out_g, r_out) < 1e-5 and ref.rel_err(lse_g, r_lse) < 1e-5
    assert ref.rel_err(combine_groups(out_g, lse_g), r_plain) < 1e-5
    empty = ~real_rows(allowed).expand(B, H, N)  # padded query rows: 0, never NaN
    assert torch.equal(combine_groups(out_g, lse_g)[empty], torch.zeros_like(r_plain[empty]).float())


@pytest.mark.parametrize("kind", KINDS)
def test_decode_rows_follow_the_model_mask(kind):
    """The last 3 query rows (a chunked prefill / decode step) with the mask's last rows: the few-rows path."""
    q, k, v, groups = inputs(q_len=3)
    allowed = loops_mask(kind)[:, :, -3:]  # [B,1,3,K]
    out_g, lse_g = group_partials(q, k, v, groups, 3, scale=SCALE, mask=allowed, window=STRUCTURED.get(kind))
    r_out, r_lse, _, _ = reference(q, k, v, allowed, groups)
    assert ref.rel_err(out_g, r_out) < 1e-5 and ref.rel_err(lse_g, r_lse) < 1e-5


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kind", ["bidirectional_blocks", "prefix_lm", "chunked", "left_padding"])
def test_biased_attention_and_key_mass_follow_the_model_mask(backend, kind):
    q, k, v, groups = inputs()
    allowed = loops_mask(kind)
    gbias = torch.tensor([0.0, -1.5, 2.0]).view(1, 1, 3).repeat(1, H, 1)  # [1,H,G]
    per_key = gbias.expand(B, -1, -1).gather(2, groups[:, None].expand(-1, H, -1))[:, :, None, :]  # [B,H,1,K]
    _, _, want, probs = reference(q, k, v, allowed, bias=per_key)
    if backend == "triton":
        from attnkit.kernels.triton import _flash

        got = _flash.biased_attention(q, k, v, groups, gbias, scale=SCALE, mask=allowed, block_m=16, block_n=16)
        mass = _flash.key_mass(q, k, scale=SCALE, mask=allowed, block_m=16, block_n=16)
    else:
        got = biased_attention(q, k, v, groups, gbias, scale=SCALE, mask=allowed, backend=backend)
        mass = key_mass(q, k, scale=SCALE, mask=allowed, backend=backend, chunk=8)
    assert ref.rel_err(got, want) < 1e-5
    _, _, _, plain_probs = reference(q, k, v, allowed)
    assert ref.rel_err(mass, plain_probs.sum(2)) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_score_bias_path_and_attention_rows_follow_the_model_mask(kind):
    """The torch backend's pre-softmax bias path (any bias broadcastable to [B,H,Q,K]) and captured rows."""
    q, k, v, _ = inputs()
    allowed = loops_mask(kind)
    bias = torch.randn(B, H, 1, N, generator=torch.Generator().manual_seed(3))  # per-head key bias
    _, _, want, probs = reference(q, k, v, allowed, bias=bias)
    got = masked_attention(q, k, v, allowed, bias, scale=SCALE, window=STRUCTURED.get(kind))
    assert ref.rel_err(got, want) < 1e-5
    rows = torch.tensor([0, 4, 9, N - 1])
    _, _, _, plain = reference(q, k, v, allowed)
    assert ref.rel_err(attention_rows(q, k, rows, scale=SCALE, mask=allowed), plain[:, :, rows]) < 1e-5


def test_float_mask_values_are_a_bias():
    """An additive float mask with values other than 0 / min (ALiBi-like) is added to the scores, not just masked."""
    q, k, v, groups = inputs()
    allowed = loops_mask("left_padding")
    alibi = -0.1 * (torch.arange(N)[:, None] - torch.arange(N)[None, :]).abs().float()  # [Q,K]
    mask = torch.where(allowed, alibi, torch.finfo(torch.float32).min)  # [B,1,Q,K]
    assert not KeyMask.build(N, N, mask=mask).structured
    r_out, r_lse, r_plain, _ = reference(q, k, v, allowed, groups, bias=alibi)
    out_g, lse_g = group_partials(q, k, v, groups, 3, scale=SCALE, mask=mask)
    assert ref.rel_err(out_g, r_out) < 1e-5 and ref.rel_err(lse_g, r_lse) < 1e-5
    assert ref.rel_err(masked_attention(q, k, v, mask, scale=SCALE), r_plain) < 1e-5


def test_per_head_mask():
    """A ``[B,H,Q,K]`` mask (different per head) is honoured head by head, with GQA."""
    q, k, v, groups = inputs()
    allowed = loops_mask("left_padding").repeat(1, H, 1, 1)
    allowed[:, 1] = loops_mask("bidirectional_blocks")[:, 0]
    allowed[:, 3] = loops_mask("chunked")[:, 0]
    r_out, r_lse, _, _ = reference(q, k, v, allowed, groups)
    out_g, lse_g = group_partials(q, k, v, groups, 3, scale=SCALE, mask=allowed)
    assert ref.rel_err(out_g, r_out) < 1e-5 and ref.rel_err(lse_g, r_lse) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_standard_masks_are_recognised_and_others_are_not(kind, monkeypatch):
    """Only causal + padding (+ window) masks take the span decomposition; every other mask the exact chunked path."""
    q, k, v, groups = inputs()
    allowed = loops_mask(kind)
    window = STRUCTURED.get(kind)
    ok, padding = recognise(allowed, N, N, causal=True, window=window)
    assert ok == (kind in STRUCTURED)
    if ok:
        want = torch.ones(B, N, dtype=torch.bool)
        want[1, :PADS[1]] = False
        assert torch.equal(padding, want)
    calls = []
    monkeypatch.setattr(grouped, "_span_group_partials",
                        lambda *a, _real=grouped._span_group_partials, **kw: calls.append(1) or _real(*a, **kw))
    out_g, lse_g = group_partials(q, k, v, groups, 3, scale=SCALE, mask=allowed, window=window)
    assert bool(calls) == (kind == "left_padding")  # the span path has no window
    r_out, r_lse, _, _ = reference(q, k, v, allowed, groups)
    assert ref.rel_err(out_g, r_out) < 1e-5 and ref.rel_err(lse_g, r_lse) < 1e-5


def test_recognises_transformers_own_masks():
    """The masks transformers builds for padded, sliding-window layers are recognised as structured."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    pad2d = torch.ones(B, N, dtype=torch.bool)
    pad2d[1, :PADS[1]] = 0
    full = sdpa_mask(batch_size=B, q_length=N, kv_length=N, mask_function=causal_mask_function, attention_mask=pad2d)
    sliding = sdpa_mask(batch_size=B, q_length=N, kv_length=N, mask_function=sliding_window_causal_mask_function(6),
                        attention_mask=pad2d, allow_is_causal_skip=False)
    assert KeyMask.build(N, N, mask=full).structured
    assert KeyMask.build(N, N, mask=sliding, window=6).structured
    assert not KeyMask.build(N, N, mask=sliding).structured  # without the window hint: exact path, never wrong
    assert KeyMask.build(N, N, mask=full, window=6).structured is False


def test_recognition_is_cached_per_mask_object_and_version(monkeypatch):
    from attnkit.kernels import masks

    allowed = loops_mask("left_padding")
    calls = []
    monkeypatch.setattr(masks, "_recognise", lambda *a, _real=masks._recognise, **kw: calls.append(1) or _real(*a, **kw))
    for _ in range(3):  # one model forward: the same mask object for every layer
        assert masks.recognise(allowed, N, N, causal=True, window=None)[0]
    assert len(calls) == 1
    allowed[0, 0, 0, 1] = True  # edited in place: recognised again, and now it is not standard
    assert not masks.recognise(allowed, N, N, causal=True, window=None)[0]
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bidirectional_blocks", "left_padding"])
def test_half_precision_fully_padded_row_gives_zeros_not_nan(dtype, kind):
    q, k, v, groups = inputs(dtype)
    allowed = loops_mask(kind)
    allowed[1, :, N // 2] = False  # a real-position row with no allowed key at all
    for mask in (allowed, as_float(allowed, dtype)):
        out_g, lse_g = group_partials(q, k, v, groups, 3, scale=SCALE, mask=mask)
        out = combine_groups(out_g, lse_g, dtype=dtype)
        plain = masked_attention(q, k, v, mask, torch.zeros(1, H, 1, N), scale=SCALE)
        mass = key_mass(q, k, scale=SCALE, mask=mask)
        for t in (out_g, out, plain, mass):
            assert not torch.isnan(t).any()
        assert torch.equal(out[1, :, N // 2], torch.zeros_like(out[1, :, N // 2]))
        assert torch.equal(plain[1, :, N // 2], torch.zeros_like(plain[1, :, N // 2]))
        _, _, want, _ = reference(q, k, v, allowed)
        assert ref.rel_err(out, want) < 2e-2 and ref.rel_err(plain, want) < 2e-2


def test_visible_counts_hand_computed():
    """Keys each row may attend: hand counts for a causal decode step, left padding, and a bidirectional block."""
    assert KeyMask.build(2, 6).visible_counts().tolist() == [[[5.0, 6.0]]]
    counts = KeyMask.build(N, N, mask=loops_mask("left_padding")).visible_counts()  # [B,1,N]
    assert counts[0, 0].tolist() == [float(i + 1) for i in range(N)]
    assert counts[1, 0].tolist() == [0.0] * 5 + [float(i + 1) for i in range(N - 5)]
    block = KeyMask.build(N, N, mask=loops_mask("bidirectional_blocks")).visible_counts()
    assert block[0, 0, :3].tolist() == [1.0, 2.0, 3.0] and block[0, 0, 3:11].tolist() == [11.0] * 8  # 3 text + 8 image
    window = KeyMask.build(N, N, mask=loops_mask("sliding_padded"), window=6).visible_counts()
    assert window[1, 0, 5:13].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0, 6.0]


def test_cross_attention_with_more_queries_than_keys():
    """Non-causal (diffusers cross-attention, Q > K): no positional assumption, exact."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 12, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8,
                                                                                                       generator=g)
    key_pad = torch.tensor([[True, True, True, False, True]]).view(1, 1, 1, 5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_pad, scale=SCALE)
    got = masked_attention(q, k, v, key_pad, torch.zeros(1, 1, 1, 5), scale=SCALE, causal=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="more queries"):
        KeyMask.build(12, 5, causal=True).block(slice(0, 12), "cpu")
