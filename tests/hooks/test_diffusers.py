"""attach() on diffusers denoisers and pipelines: no-op parity, exact undo, key labels, captures vs hand computation."""

import pytest
import torch

import attnkit
from attnkit.interventions.noop import Noop
from attnkit.testing import DIFFUSION_FAMILIES, denoiser_inputs, tiny_denoiser, tiny_sd_pipeline


@pytest.mark.parametrize("family", DIFFUSION_FAMILIES)
@pytest.mark.parametrize("hooks", [("score_bias", "edit_output"), ("group_factors", "edit_probs")], ids=["torch", "eager"])
def test_denoiser_noop_parity_and_exact_undo(family, hooks):
    model = tiny_denoiser(family)
    inputs = denoiser_inputs(family)
    processors_before = {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")}
    with torch.no_grad():
        stock = model(**inputs)[0]
        with attnkit.attach(model, [Noop(hooks=hooks)]) as handle:
            patched = model(**inputs)[0]
            n_sites = handle.description.component("denoiser").num_layers
            calls = handle.report()["calls"]["noop"]
        after = model(**inputs)[0]
    torch.testing.assert_close(patched, stock, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, stock)
    assert calls == n_sites
    assert {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")} == processors_before


class RecordKeys(attnkit.Intervention):
    name = "test-record-keys"

    def __init__(self, **target):
        super().__init__(**target)
        self.text = []

    def edit_output(self, out, ctx):
        self.text.append(ctx.key_mask("text")[0].cpu())
        return out


@pytest.mark.parametrize("family, expected", [
    ("sd3", lambda n_img: torch.cat([torch.zeros(n_img), torch.ones(5)]).bool()),   # [image, text]
    ("flux", lambda n_img: torch.cat([torch.ones(5), torch.zeros(n_img)]).bool()),  # [text, image]
])
def test_joint_attention_key_labels(family, expected):
    model = tiny_denoiser(family)
    with torch.no_grad(), attnkit.attach(model, [RecordKeys()]) as handle:
        model(**denoiser_inputs(family))
    probe = handle.intervention("test-record-keys")  # the copy bound to this attachment holds what it recorded
    assert len(probe.text) == 2
    for mask in probe.text:  # both dual-stream and (Flux) single-stream blocks
        assert torch.equal(mask, expected(mask.numel() - 5))


def test_unet_cross_attention_capture_matches_hand_computation():
    model = tiny_denoiser("unet")
    inputs = denoiser_inputs("unet")
    cross = [m for n, m in model.named_modules() if n.endswith("attn2")][0]
    seen = {}
    hook = cross.register_forward_hook(lambda m, a, kw, out: seen.update(h=a[0], enc=kw["encoder_hidden_states"]),
                                       with_kwargs=True)
    with torch.no_grad(), attnkit.attach(model, []) as handle, handle.capture(layers=[1], queries="all") as cap:
        model(**inputs)
    hook.remove()
    rec = cap.records[0]
    assert rec.kind == "cross" and rec.call == 1
    with torch.no_grad():
        q = cross.to_q(seen["h"]).unflatten(-1, (cross.heads, -1)).transpose(1, 2)  # [B,H,N,D]
        k = cross.to_k(seen["enc"]).unflatten(-1, (cross.heads, -1)).transpose(1, 2)  # [B,H,T,D]
        expected = torch.softmax(q @ k.transpose(-1, -2) * cross.scale, dim=-1)  # [B,H,N,T]
    torch.testing.assert_close(rec.probs, expected, atol=1e-5, rtol=1e-4)


def test_pipeline_attach_finds_unet_and_matches_stock_images():
    pipe = tiny_sd_pipeline()
    run = lambda: pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),  # noqa: E731
                       output_type="pt", height=16, width=16).images
    stock = run()
    with attnkit.attach(pipe, [Noop(hooks=("score_bias",))]) as handle, handle.capture(layers=[1]) as cap:
        patched = run()
        steps = sorted({r.call for r in cap.records})
    torch.testing.assert_close(patched, stock, atol=1e-5, rtol=1e-5)
    assert steps == [1, 2]  # one record per denoising step
    assert torch.equal(run(), stock)
    assert handle.report()["adapter"] == "diffusers"
