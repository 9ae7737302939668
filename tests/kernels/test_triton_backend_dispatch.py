"""The `triton` backend end to end through attach(): under the interpreter on CPU (a real GPU in the device runs)."""

import pytest
import torch

import attnkit
from attnkit.kernels.triton import triton_available
from attnkit.testing import tiny_causal_lm

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not importable / not interpreting")


class DampFirst(attnkit.Intervention):
    name = "test-triton-damp-first"

    def key_groups(self):
        return ("first",)

    def group_factors(self, mass, ctx):  # mass [B,H,Q,2]
        rest, sink = mass[..., :1], mass[..., 1:]
        return torch.cat([(rest + 0.7 * sink) / rest.clamp_min(1e-12), torch.full_like(sink, 0.3)], dim=-1)


def test_triton_backend_matches_eager_through_attach():
    model = tiny_causal_lm("llama", head_dim=16)
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    outs = {}
    with torch.no_grad():
        for backend in ("eager", "triton"):
            with attnkit.attach(model, [DampFirst(heads=[1, 3])], backend=backend) as handle:
                assert {m["backend"] for m in handle.report()["modules"]} == {backend}
                outs[backend] = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (outs["triton"] - outs["eager"])[real].abs().max() <= 5e-5


def test_auto_never_picks_the_interpreter_on_cpu():
    model = tiny_causal_lm("llama")
    with attnkit.attach(model, [DampFirst()]) as handle:
        assert {m["backend"] for m in handle.report()["modules"]} == {"torch"}


def test_triton_backend_runs_the_gemma3_bidirectional_mask():
    """Explicit mask tiles in the kernels: VAR + ACT on the tiny Gemma3 VLM (image blocks attend bidirectionally,
    one sliding layer, different left padding per sample) equal the eager reference."""
    from test_kernels_vlm_masks import _left_pad, _var

    from attnkit.interventions.sinks.act import ACT
    from attnkit.testing import tiny_vlm, vlm_inputs

    model = tiny_vlm("gemma3")
    samples = [vlm_inputs("gemma3", model, batch=1, text_len=n, seed=s) for n, s in ((5, 0), (2, 1))]
    width = max(x["input_ids"].shape[1] for x in samples)
    batch = {key: torch.cat([_left_pad(x[key], width) for x in samples])
             for key in ("input_ids", "attention_mask", "token_type_ids")}
    batch["pixel_values"] = torch.cat([x["pixel_values"] for x in samples])
    outs = {}
    with torch.no_grad():
        for backend in ("eager", "triton"):
            with attnkit.attach(model, [_var(0.5, layers=[0]), ACT(beta=0.4, layers=[1])], backend=backend):
                outs[backend] = model(**batch).logits
    real = batch["attention_mask"].bool()
    assert (outs["triton"] - outs["eager"])[real].abs().max() <= 5e-5
