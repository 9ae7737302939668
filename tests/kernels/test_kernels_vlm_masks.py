"""The fused backends inside a model whose masks are not "causal + padding": a tiny Gemma3 VLM (bidirectional
attention inside each image block, one sliding-window layer), with different left padding in every sample.

Before the fused paths took the model's mask, VAR with p = 0 (a no-op) moved these logits by 0.09 on the torch
backend — which ``auto`` picks — while the eager backend matched stock to 3e-7.
"""

import warnings

import pytest
import torch

import attnkit
from attnkit.interventions.sinks.act import ACT
from attnkit.interventions.sinks.var import VAR
from attnkit.testing import tiny_causal_lm, tiny_vlm, vlm_inputs

warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*did not run.*")


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([torch.zeros(t.shape[0], width - t.shape[1], dtype=t.dtype), t], dim=1)


@pytest.fixture(scope="module")
def gemma3():
    """(model, batch): two samples with 0 and 3 pad tokens on the left, one image each, token_type_ids."""
    model = tiny_vlm("gemma3")
    samples = [vlm_inputs("gemma3", model, batch=1, text_len=n, seed=s) for n, s in ((6, 0), (3, 1))]
    width = max(x["input_ids"].shape[1] for x in samples)
    batch = {key: torch.cat([_left_pad(x[key], width) for x in samples])
             for key in ("input_ids", "attention_mask", "token_type_ids")}
    batch["pixel_values"] = torch.cat([x["pixel_values"] for x in samples])
    assert batch["attention_mask"].sum(1).tolist() == [width, width - 3]
    return model, batch


def _var(p, **kw):
    return VAR(p=p, tau=1.5, first_layer=0, except_last_layer=False, rho=0.0, min_image_mass=0.0, queries="all",
               sink_dims="auto", require_visual_sink=False, **kw)


def _run(model, batch, interventions, backend):
    with attnkit.attach(model, interventions, backend=backend) as handle, torch.no_grad():
        logits = model(**batch).logits
        used = {m["backend"] for m in handle.report()["modules"]}
    return logits, used


@pytest.mark.parametrize("backend", ["torch", "auto", "eager"])
@pytest.mark.parametrize("neutral", ["var-p0", "act-beta1"])
def test_neutral_parameters_equal_stock_under_bidirectional_image_masks(gemma3, backend, neutral):
    model, batch = gemma3
    with torch.no_grad():
        stock = model(**batch).logits
    iv = _var(0.0) if neutral == "var-p0" else ACT(beta=1.0)
    logits, used = _run(model, batch, [iv], backend)
    assert used == ({"eager"} if backend == "eager" else {"torch"})  # auto picks the fused path on CPU
    real = batch["attention_mask"].bool()
    assert (logits - stock)[real].abs().max() <= 1e-5


def test_fused_equals_eager_for_real_edits_prefill_and_generate(gemma3):
    """VAR (p = 0.5) on the sliding layer and ACT (β = 0.4) on the full layer: torch == eager, prefill and decode."""
    model, batch = gemma3
    out = {}
    for backend in ("eager", "torch"):
        with attnkit.attach(model, [_var(0.5, layers=[0]), ACT(beta=0.4, layers=[1])], backend=backend), \
                torch.no_grad():
            logits = model(**batch).logits
            gen = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)
        out[backend] = logits, torch.stack(gen.scores)
    with torch.no_grad():
        stock = model(**batch).logits
    real = batch["attention_mask"].bool()
    assert (out["eager"][0] - stock)[real].abs().max() > 1e-2, "the edits must change something"
    assert (out["torch"][0] - out["eager"][0])[real].abs().max() <= 1e-5
    assert (out["torch"][1] - out["eager"][1]).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_with_a_fully_padded_sample_gives_no_nan(dtype):
    """A batch with one sample that is only padding: every fused path stays finite and the real samples match
    their fp32 values within half-precision error."""
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2] = 0  # fully padded sample
    outs = {}
    for dt in (torch.float32, dtype):
        model.to(dt)
        with attnkit.attach(model, [ACT(beta=0.4, layers=[1]), _KeyBias(layers=[0])], backend="torch"), \
                torch.no_grad():
            outs[dt] = model(ids, attention_mask=mask).logits.float()
    model.float()
    assert torch.isfinite(outs[dtype]).all()
    real = mask.bool()
    assert (outs[dtype] - outs[torch.float32])[real].abs().max() < 0.1


class _KeyBias(attnkit.Intervention):
    """A pre-softmax key bias on layer 0 (the torch backend's chunked bias path)."""

    name = "test-key-bias"

    def score_bias(self, ctx):
        return torch.linspace(-1.0, 1.0, ctx.k_len, device=ctx.device).view(1, 1, 1, -1)
