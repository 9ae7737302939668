"""head-temperature with log-length scaling: each query row is scaled by max(1, log n / log n0) with n the keys
*that row* may attend under the model's mask, so batching, KV-cache decoding and later tokens change nothing.

Before: every row used the call's padded key count, so on real SmolLM2 (base 16) batched vs per-sample logits
differed by 1.1, decode vs recomputation by 1.6, and a position's logits moved by 1.8 with the tokens after it.
"""

import math
import warnings

import pytest
import torch

import attnkit
from attnkit.interventions.base import AttentionContext
from attnkit.interventions.calibration.temperature import HeadTemperature, log_length_factor
from attnkit.kernels.eager import eager_attention
from attnkit.kernels.plan import PlanEntry
from attnkit.kernels.torch_path import torch_attention
from attnkit.testing import tiny_causal_lm

warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*did not run.*")


def test_factor_hand_computed():
    assert log_length_factor(torch.tensor([0.0, 1.0, 8.0, 64.0, 4096.0]), 64).tolist() == [1.0, 1.0, 1.0, 1.0, 2.0]
    torch.testing.assert_close(log_length_factor(torch.tensor([128.0]), 64), torch.tensor([7 / 6]))


@pytest.mark.parametrize("backend", [eager_attention, torch_attention], ids=["eager", "torch"])
def test_row_factors_hand_computed_under_padding_and_a_bidirectional_block(backend):
    """Scores of row i are scaled by max(1, log2 n_i), n_i counted by hand from the mask; softmax by hand."""
    B, H, N, D = 2, 2, 6, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    allowed = torch.ones(N, N).tril().bool().repeat(B, 1, 1, 1)  # [B,1,N,N]
    allowed[1, :, :, :2] = False  # sample 1: two left pads ...
    allowed[1, :, :2, :] = False  # ... whose query rows see nothing
    allowed[0, :, 2:4, 2:4] = True  # sample 0: keys 2-3 attend each other (an image block)
    visible = allowed.sum(-1).float()  # [B,1,N]
    assert visible[0, 0].tolist() == [1, 2, 4, 4, 5, 6] and visible[1, 0].tolist() == [0, 0, 1, 2, 3, 4]
    factor = torch.tensor([[max(1.0, math.log2(n)) if n > 0 else 1.0 for n in row] for row in visible[:, 0].tolist()])
    scale = 0.5
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale * factor.double()[:, None, :, None]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    want = probs @ v.double()  # [B,H,N,D]
    iv = HeadTemperature(log_length_base=2)
    entry = PlanEntry(iv, torch.ones(H, dtype=torch.bool))

    def make_ctx(e, rows=None):
        return AttentionContext(layer=0, module=None, tracker=None, batch=B, num_heads=H, q_len=N, k_len=N,
                                causal=True, device=torch.device("cpu"), heads=e.head_mask, query_rows=rows)

    got = backend(q, k, v, allowed, scaling=scale, entries=[entry], make_ctx=make_ctx, causal=True)
    got = got[0] if isinstance(got, tuple) else got
    real = allowed.any(-1)[:, 0]  # [B,N]
    torch.testing.assert_close(got.double().transpose(1, 2)[real], want.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def llama():
    return tiny_causal_lm("llama")


def _attach(model, backend, base=4):
    return attnkit.attach(model, [HeadTemperature(temperature=[1.0, 0.5, 2.0, 1.0], log_length_base=base)],
                          backend=backend)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_batched_with_different_left_padding_equals_per_sample(family, backend):
    model = tiny_causal_lm(family)
    g = torch.Generator().manual_seed(1)
    lengths = (12, 7, 3)
    samples = [torch.randint(3, 100, (1, n), generator=g) for n in lengths]
    ids = torch.cat([torch.cat([torch.zeros(1, 12 - s.shape[1], dtype=torch.long), s], 1) for s in samples])
    mask = torch.stack([torch.arange(12) >= 12 - n for n in lengths]).long()
    with _attach(model, backend), torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = [model(s).logits[0] for s in samples]
    for b, n in enumerate(lengths):
        assert (batched[b, -n:] - alone[b]).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_kv_cache_decode_equals_full_recomputation(llama, backend):
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with _attach(llama, backend), torch.no_grad():
        gen = llama.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
        full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], 1)
        full = llama(gen.sequences, attention_mask=full_mask).logits  # [B, 11, V]
    decoded = torch.stack(gen.scores, 1)  # [B, 5, V]
    assert (decoded - full[:, 5:10]).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_a_positions_logits_do_not_depend_on_later_tokens(llama, backend):
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stock = llama(ids[:, :6]).logits
        with _attach(llama, backend):
            short = llama(ids[:, :6]).logits
            long = llama(ids).logits[:, :6]
    assert (short - long).abs().max() <= 1e-5
    assert (short - stock).abs().max() > 1e-3, "the scaling must be active on these lengths (base 4)"


def test_per_row_query_scale_contract_is_checked(llama):
    class Bad(attnkit.Intervention):
        name = "test-bad-row-scale"

        def query_scale(self, ctx):
            return torch.ones(ctx.q_len, 3)  # neither [H] nor broadcastable to [B,H,Q,1]

    with attnkit.attach(llama, [Bad(layers=[0])], backend="torch"), pytest.raises(ValueError, match=r"\[B,H,Q,1\]"):
        llama(torch.tensor([[5, 6, 7]]))


@pytest.mark.slow
def test_real_smollm2_gaps(smollm2):
    """The three gaps of issue 12 on the real model (base 16 so that these short prompts are scaled)."""
    model, tok = smollm2
    prompts = ["The capital of France is Paris, and the capital of Germany is Berlin. The capital of Italy is",
               "Water boils at one hundred degrees Celsius at sea level. At high altitude it boils at",
               "One, two, three, four, five,"]
    with attnkit.attach(model, [HeadTemperature(log_length_base=16)]) as handle, torch.no_grad():
        assert {m["backend"] for m in handle.report()["modules"]} == {"torch"}
        enc = tok(prompts, return_tensors="pt", padding=True)
        batched = model(**enc).logits
        for i, prompt in enumerate(prompts):
            one = model(**tok([prompt], return_tensors="pt")).logits[0]
            assert (batched[i, -one.shape[0]:] - one).abs().max() <= 1e-4
        ids = tok([prompts[0]], return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        full = model(gen.sequences).logits[0]
        n0 = ids.shape[1]
        assert (torch.stack(gen.scores)[:, 0] - full[n0 - 1:n0 + 4]).abs().max() <= 1e-4
        assert (model(ids).logits[0] - full[:n0]).abs().max() <= 1e-4
    with torch.no_grad():
        assert (model(**enc).logits - batched)[enc.attention_mask.bool()].abs().max() > 0.1  # it does scale


def test_docstring_examples():
    import doctest

    from attnkit.interventions.calibration import temperature

    assert doctest.testmod(temperature).failed == 0
