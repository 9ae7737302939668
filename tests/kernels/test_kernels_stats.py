"""key_mass / attention_rows against the materialised fp64 reference, and triton packaging checks."""

import subprocess
import sys

import pytest
import torch

import kernel_ref as ref
from test_kernels_grouped import SCALE, backends, make_case
from attnkit.kernels.stats import attention_rows, key_mass


def run_key_mass(backend, q, k, **kw):
    if backend == "triton":
        from attnkit.kernels.triton import _flash

        return _flash.key_mass(q, k, scale=SCALE, block_m=16, block_n=16, **kw)
    return key_mass(q, k, scale=SCALE, backend=backend, chunk=8, **kw)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", ["prefill", "decode", "chunked_prefill", "gqa", "left_padding", "sink_window"])
def test_key_mass_matches_reference(backend, case):
    q, k, _, _, kw = make_case(case)
    B, Q = q.shape[0], q.shape[2]
    p = ref.probs(q, k, SCALE, **kw)  # [B,H,Q,K]
    assert ref.rel_err(run_key_mass(backend, q, k, **kw), p.sum(2)) < 1e-5
    select = torch.zeros(B, Q, dtype=torch.bool)
    select[:, -1] = True  # FastV: last query only
    select[0, Q // 2] = True  # a row selected in one sample only
    want = (p * select[:, None, :, None]).sum(2)
    assert ref.rel_err(run_key_mass(backend, q, k, query_select=select, **kw), want) < 1e-5


@pytest.mark.parametrize("backend", backends())
def test_key_mass_fp16(backend):
    q, k, _, _, kw = make_case("sink_window", dtype=torch.float16)
    want = ref.probs(q, k, SCALE, **kw).sum(2)
    assert ref.rel_err(run_key_mass(backend, q, k, **kw), want) < 2e-3


def test_key_mass_padded_rows_contribute_nothing():
    q, k, _, _, kw = make_case("left_padding")
    m = key_mass(q, k, scale=SCALE, **kw)
    assert torch.equal(m[1, :, :7], torch.zeros_like(m[1, :, :7]))  # padded keys receive nothing
    # every real row's probabilities sum to 1: sample 1 has 20 - 7 real rows
    torch.testing.assert_close(m[1].sum(-1), torch.full((2,), 13.0))


@pytest.mark.parametrize("case", ["prefill", "chunked_prefill", "sink_window", "left_padding"])
def test_attention_rows(case):
    q, k, _, _, kw = make_case(case)
    rows = torch.tensor([0, 3, -1])
    got = attention_rows(q, k, rows, scale=SCALE, **kw)
    want = ref.probs(q, k, SCALE, **kw)[:, :, rows % q.shape[2]]
    assert got.shape == want.shape
    assert ref.rel_err(got, want) < 1e-5
    assert not torch.isnan(got).any()


def test_importing_attnkit_kernels_does_not_import_triton():
    code = ("import sys, attnkit.kernels.grouped, attnkit.kernels.stats, attnkit.kernels.triton as t; "
            "t.triton_available(); assert 'triton' not in sys.modules, 'triton imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "", "TRITON_INTERPRET": "0"})


def test_triton_available_follows_interpreter_flag():
    code = "import attnkit.kernels.triton as t, torch; print(t.triton_available())"
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                             env={"PATH": "", "TRITON_INTERPRET": flag}).stdout.strip()
        import torch as _torch

        assert out == str(flag == "1" or _torch.cuda.is_available())


def test_triton_rejects_small_blocks_and_many_groups():
    from attnkit.kernels.triton import triton_available

    if not triton_available():
        pytest.skip("no triton")
    from attnkit.kernels.triton import _flash

    q, k, v, key_group, kw = make_case("decode")
    with pytest.raises(ValueError, match="BLOCK_M"):
        _flash.group_partials(q, k, v, key_group, 3, scale=SCALE, block_m=8)
    with pytest.raises(ValueError, match="groups"):
        _flash.group_partials(q, k, v, key_group, 9, scale=SCALE)


def test_block_lists_skip_masked_blocks():
    """The block-sparse lists visit only blocks that hold a real key of the group inside the causal band."""
    from attnkit.kernels.triton import triton_available

    if not triton_available():
        pytest.skip("no triton")
    from attnkit.kernels.triton import _flash

    K = 64
    grp = torch.zeros(1, K, dtype=torch.int32)
    grp[0, 16:48] = 2  # image blocks 1, 2
    grp[0, 0] = 1
    idx, cnt = _flash.block_lists(grp, None, K, K, 3, True, causal=True, window=None, block_m=16, block_n=16)
    assert cnt[0, 1].tolist() == [1, 1, 1, 1]  # sink block 0 for every query block
    assert cnt[0, 2].tolist() == [0, 1, 2, 2]  # image: nothing before it starts
    assert idx[0, 2, 3, :2].tolist() == [1, 2]
    assert cnt[0, 0].tolist() == [1, 1, 1, 2]  # text: block 0, then block 3 when causal allows
