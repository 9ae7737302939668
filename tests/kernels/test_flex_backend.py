"""The ``flex`` backend (compiled FlexAttention) against the fp64 reference and the eager backend.

Block masks and capabilities are checked without compiling anything. The tests that run compiled flex are marked
``slow``: every new shape / score_mod compiles a kernel (10–50 s each on the 2-core CPU this was written on); they
share one padded shape (Q = K = 150 → 256) so that they compile few kernels.
"""

import pytest
import torch

import attnkit
import kernel_ref as ref
from attnkit.kernels import flex
from attnkit.kernels.backends import BACKENDS, choose_backend, explain, flex_unavailable
from attnkit.kernels.masks import KeyMask

SCALE = 0.25
TOL = 1e-5
needs_flex = pytest.mark.skipif(flex_unavailable("cpu") is not None, reason=str(flex_unavailable("cpu")))


def _dense_allowed(keys: KeyMask, B: int) -> torch.Tensor:
    """[B, Qp, Kp] bool of the mask over the padded lengths (pairs outside Q x K disallowed)."""
    Q, K = keys.q_len, keys.k_len
    _, ok, _ = keys.block(slice(0, Q), "cpu", restrict=False)  # [B|1,1,Q,K]
    out = torch.zeros(B, flex._padded(Q), flex._padded(K), dtype=torch.bool)
    out[:, :Q, :K] = ok[:, 0].expand(B, Q, K)
    return out


def _check_block_mask(block_mask, allowed: torch.Tensor, Q: int):
    """Blocks marked full are all allowed, blocks left out have nothing allowed, mask_mod equals ``allowed`` on
    every real pair. Padded query rows (``>= Q``, cut off after the call) may be anything."""
    B, Qp, Kp = allowed.shape
    nq, nk, bs = Qp // flex.BLOCK, Kp // flex.BLOCK, flex.BLOCK
    blocks = allowed.view(B, nq, bs, nk, bs)
    real_row = (torch.arange(Qp) < Q).view(1, nq, bs, 1, 1)
    any_ok = (blocks & real_row).any(4).any(2)  # [B,nq,nk]
    all_ok = (blocks | ~real_row).all(4).all(2)
    partial = torch.zeros(B, nq, nk, dtype=torch.bool)
    full = torch.zeros(B, nq, nk, dtype=torch.bool)
    for b in range(B):
        for i in range(nq):
            n = int(block_mask.kv_num_blocks[b, 0, i])
            partial[b, i, block_mask.kv_indices[b, 0, i, :n].long()] = True
            m = int(block_mask.full_kv_num_blocks[b, 0, i])
            full[b, i, block_mask.full_kv_indices[b, 0, i, :m].long()] = True
    assert not (partial & full).any()
    assert torch.equal(full & ~all_ok, torch.zeros_like(full)), "a block marked full masks some pair"
    assert torch.equal(any_ok & ~(partial | full), torch.zeros_like(any_ok)), "a block with allowed pairs is skipped"
    q_idx, kv_idx = torch.arange(Qp)[:, None], torch.arange(Kp)[None, :]
    for b in range(B):
        got = block_mask.mask_mod(torch.tensor(b), torch.tensor(0), q_idx, kv_idx).expand(Qp, Kp)
        inside = partial[b].repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:Q]  # pairs mask_mod decides
        assert torch.equal(got[:Q] & inside, allowed[b, :Q] & inside)


MASKS = {
    "causal": dict(Q=300, K=300),
    "suffix_queries": dict(Q=130, K=300),
    "padding": dict(Q=300, K=300, key_padding=True),
    "window_sinks": dict(Q=300, K=300, window=100, num_sinks=3, key_padding=True),
    "non_causal": dict(Q=20, K=300, causal=False),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_structured_block_mask_is_exact(name):
    spec = dict(MASKS[name])
    B, Q, K = 2, spec.pop("Q"), spec.pop("K")
    if spec.pop("key_padding", False):
        spec["key_padding"] = torch.ones(B, K, dtype=torch.bool)
        spec["key_padding"][1, :140] = False  # a whole block and a bit padded
    keys = KeyMask.build(Q, K, **spec)
    block_mask = flex.structured_block_mask(keys, B, "cpu")
    assert block_mask.shape == (B, 1, flex._padded(Q), flex._padded(K))
    _check_block_mask(block_mask, _dense_allowed(keys, B), Q)


def test_explicit_block_mask_is_exact():
    B, N = 2, 300
    allowed = torch.ones(N, N).tril().bool().repeat(B, 1, 1, 1)  # [B,1,N,N]
    allowed[:, :, 100:220, 100:220] = True  # a bidirectional image block
    allowed[1, :, :, :30] = False  # padding in sample 1
    keys = KeyMask.build(N, N, mask=allowed)
    assert not keys.structured
    block_mask, add = flex._mask_for(keys, B, "cpu")
    assert add is None
    _check_block_mask(block_mask, _dense_allowed(keys, B), N)


def test_cpu_capabilities_are_honest():
    """Compiled flex on CPU refuses return_lse (torch 2.13): no group_factors on CPU, and auto never picks flex
    on CPU; the explicit choice says what is missing."""
    backend = BACKENDS.get("flex")
    assert "group_factors" not in backend.capabilities_on("cpu")
    assert "group_factors" in backend.capabilities_on("cuda")
    assert {"softcap", "score_bias", "query_scale", "key_stats"} <= backend.capabilities_on("cpu")
    with pytest.raises(ValueError, match="needs 'group_factors'"):
        choose_backend("flex", {"group_factors": ["var"]}, "cpu")
    assert choose_backend("auto", {"softcap": ["gemma2"]}, "cpu").name == "eager"
    verdicts = {v["backend"]: v for v in explain({"score_bias": ["pasta"]}, "cpu")}
    assert verdicts["torch"]["chosen"] and not verdicts["flex"]["eligible"]
    assert ("never automatic on CPU" if flex_unavailable("cpu") is None else "unavailable") in verdicts["flex"]["reason"]
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="cannot return the log-sum-exp"):
        flex.flex_group_partials(q, k, v, torch.zeros(1, 16, dtype=torch.long), 2, KeyMask.build(16, 16), scale=0.5)


def test_auto_uses_the_measured_costs_and_falls_back_to_the_static_order(monkeypatch):
    cpu = {v["backend"]: v for v in explain({"group_factors": ["var"], "key_stats": ["act"]}, "cpu")}
    assert cpu["torch"]["chosen"] and cpu["torch"]["cost"] < cpu["eager"]["cost"]
    # on CUDA (every backend made available here): the H200 costs pick triton for grouped edits with statistics,
    # flex for a score bias (triton has none), never the torch path
    for name in BACKENDS:
        monkeypatch.setattr(BACKENDS.get(name), "available", lambda device_type: None)
    gpu = {v["backend"]: v for v in explain({"group_factors": ["var"], "key_stats": ["act"]}, "cuda")}
    assert gpu["triton"]["chosen"] and gpu["triton"]["cost"] == 3.53 + 4.32
    assert gpu["eager"]["cost"] < gpu["torch"]["cost"]
    assert choose_backend("auto", {"score_bias": ["pasta"]}, "cuda").name == "flex"
    assert choose_backend("auto", {"edit_output": ["gain"]}, "cuda").name == "triton"
    from attnkit.kernels.backends import COSTS

    monkeypatch.delitem(COSTS, "cuda")  # no cost table: the documented order
    eligible = [v for v in explain({"score_bias": ["pasta"]}, "cuda") if v["eligible"]]
    assert all(v["cost"] is None for v in eligible)
    assert eligible[0]["backend"] == "flex" and eligible[0]["chosen"] and "static order" in eligible[0]["reason"]


# ---- compiled flex (slow: each kernel compiles) --------------------------------------------------------------------
def _inputs(B=2, H=2, Hkv=1, N=150, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=gen), torch.randn(B, Hkv, N, D, generator=gen),
            torch.randn(B, Hkv, N, D, generator=gen))


@pytest.mark.slow
@needs_flex
def test_compiled_flex_key_bias_padding_gqa():
    q, k, v = _inputs()
    B, H, N = q.shape[0], q.shape[1], q.shape[2]
    pad = torch.ones(B, N, dtype=torch.bool)
    pad[1, :7] = False
    bias = torch.randn(B, 1, 1, N, generator=torch.Generator().manual_seed(4))
    out = flex.flex_biased_attention(q, k, v, KeyMask.build(N, N, key_padding=pad), bias, scale=SCALE)
    want = ref.attention(q, k, v, SCALE, bias[:, :, 0].expand(B, H, N), key_padding=pad)
    assert ref.rel_err(out, want) < TOL
    assert torch.equal(out[1, :, :7], torch.zeros_like(out[1, :, :7]))  # rows that see only padding


@pytest.mark.slow
@needs_flex
def test_compiled_flex_window_and_sinks():
    q, k, v = _inputs()
    N = q.shape[2]
    pad = torch.ones(2, N, dtype=torch.bool)
    pad[0, :3] = False
    keys = KeyMask.build(N, N, key_padding=pad, window=20, num_sinks=2)
    out = flex.flex_biased_attention(q, k, v, keys, None, scale=SCALE)
    assert ref.rel_err(out, ref.attention(q, k, v, SCALE, key_padding=pad, window=20, num_sinks=2)) < TOL


@pytest.mark.slow
@needs_flex
def test_compiled_flex_explicit_bidirectional_mask():
    q, k, v = _inputs()
    N = q.shape[2]
    allowed = torch.ones(N, N).tril().bool().repeat(2, 1, 1, 1)
    allowed[:, :, 40:90, 40:90] = True
    out = flex.flex_biased_attention(q, k, v, KeyMask.build(N, N, mask=allowed), None, scale=SCALE)
    s = ref.scores(q, k, SCALE).masked_fill(~allowed, float("-inf"))
    want = torch.softmax(s, -1) @ v.double().repeat_interleave(2, dim=1)
    assert ref.rel_err(out, want) < TOL


class _Bias(attnkit.Intervention):
    name = "test-flex-key-bias"

    def score_bias(self, ctx):
        return torch.linspace(-2.0, 1.0, ctx.k_len).view(1, 1, 1, -1)


class _Temperature(attnkit.Intervention):
    name = "test-flex-row-temperature"

    def query_scale(self, ctx):
        return (1.0 + 0.01 * ctx.visible_keys()).unsqueeze(-1)  # per row [B|1,H|1,Q,1]


@pytest.mark.slow
@needs_flex
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_flex_backend_equals_eager_through_attach(family):
    """Prefill through compiled flex (Gemma2: logit soft-capping and a sliding layer), decode through the eager
    rows: logits equal the eager backend's, with different left padding per sample."""
    from attnkit.testing import tiny_causal_lm

    model = tiny_causal_lm(family)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = {}
    with torch.no_grad():
        for backend in ("eager", "flex"):
            with attnkit.attach(model, [_Bias(layers=[0]), _Temperature(layers=[1])], backend=backend) as handle:
                assert {m["backend"] for m in handle.report()["modules"]} == {backend}
                logits = model(ids, attention_mask=mask).logits
                gen = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                                     output_scores=True, return_dict_in_generate=True)
            out[backend] = logits, torch.stack(gen.scores)
    real = mask.bool()
    assert (out["flex"][0] - out["eager"][0])[real].abs().max() <= 1e-4
    assert (out["flex"][1] - out["eager"][1]).abs().max() <= 1e-4


def test_cpu_flex_needs_a_tested_torch(monkeypatch):
    """Compiled flex on CPU is refused, with the reason, on a torch older than the one it was tested on."""
    from attnkit.kernels import backends

    assert backends._torch_release("2.13.0+cpu") == (2, 13) and backends._torch_release("2.7.0") == (2, 7)
    monkeypatch.setattr(torch, "__version__", "2.7.0")
    reason = flex_unavailable("cpu")
    assert reason is not None and "2.7.0" in reason and "2.13" in reason
    with pytest.raises(ValueError, match="unavailable on cpu"):
        choose_backend("flex", {"score_bias": ["pasta"]}, "cpu")


@pytest.mark.parametrize("layout", ["causal", "left padding + window + sinks", "GQA"])
def test_group_partials_give_each_group_its_own_keys(monkeypatch, layout):
    """flex_group_partials with uncompiled flex (which returns the LSE on CPU) equals the eager partials group by
    group. On CUDA (torch 2.11, H200) the group as a Python default argument gave groups another group's partials
    (benchmarks/GPU.md); the group now reaches the kernel as a tensor (``_in_group_mask_mod``)."""
    from torch.nn.attention.flex_attention import flex_attention

    from attnkit.kernels import grouped

    monkeypatch.setattr(flex, "_compiled", lambda: flex_attention)
    q, k, v = _inputs(Hkv=1 if layout == "GQA" else 2, N=150)
    groups = torch.zeros(2, 150, dtype=torch.long)
    groups[:, 0] = 1
    groups[:, 40:120] = 2
    kw = {"key_padding": torch.arange(150)[None, :] >= torch.tensor([[0], [17]]), "window": 50, "num_sinks": 2} \
        if layout.startswith("left") else {}
    want_out, want_lse = grouped.group_partials(q, k, v, groups, 3, scale=SCALE, backend="eager", **kw)
    got_out, got_lse = flex.flex_group_partials(q, k, v, groups, 3, KeyMask.build(150, 150, **kw), scale=SCALE)
    assert torch.equal(torch.isneginf(got_lse), torch.isneginf(want_lse))
    seen = torch.isfinite(want_lse)
    assert (got_lse - want_lse)[seen].abs().max() <= TOL
    assert (got_out - want_out).abs().max() <= TOL


def test_group_mask_mod_reads_the_group_from_a_tensor():
    rule = flex._in_group_mask_mod(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, torch.tensor([[True, False, True]]))
    assert rule.__defaults__ is None  # no Python constant for the compiler to bake in
    allowed = [[bool(rule(torch.tensor(0), 0, torch.tensor(qi), torch.tensor(ki))) for ki in range(3)]
               for qi in range(3)]
    assert allowed == [[True, False, False], [True, False, False], [True, False, True]]


def test_out_of_shared_memory_retries_with_small_blocks(monkeypatch):
    """When every block configuration needs more shared memory than the card has, flex runs again with
    ``SMALL_BLOCKS`` instead of failing the forward (seen on an H200 with torch 2.11 in fp16)."""
    from torch.nn.attention.flex_attention import flex_attention

    asked = []

    def fussy(*args, kernel_options=None, **kwargs):
        asked.append(kernel_options)
        if kernel_options is None:
            raise RuntimeError("No valid triton configs. OutOfMemoryError: out of resource: Required: 311296")
        return flex_attention(*args, **kwargs)

    monkeypatch.setattr(flex, "_compiled", lambda: fussy)
    q, k, v = _inputs(N=20)
    keys = KeyMask.build(20, 20)
    base, add = flex._mask_for(keys, 2, q.device)
    out = flex._run(q, k, v, scale=SCALE, score_mod=flex._score_mod(None, None, None, add), block_mask=base)
    assert asked == [None, flex.SMALL_BLOCKS]
    assert (out - ref.attention(q, k, v, scale=SCALE)).abs().max() <= TOL

    monkeypatch.setattr(flex, "_compiled", lambda: lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):
        flex._run(q, k, v, scale=SCALE, score_mod=None, block_mask=base)
