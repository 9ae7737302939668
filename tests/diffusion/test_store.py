"""AttentionStore: keyed by the timestep the denoiser used (not a call counter), rows/heads/dtype/offload, memory
in bytes, recorded maps equal to a hand softmax of the recorded q and k, and recording changes nothing."""

import pytest
import torch

import attnkit
from attnkit.diffusion.inversion import ddim_invert
from attnkit.diffusion.store import AttentionStore
from attnkit.testing import tiny_pipeline

SELF = "mid_block.attentions.0.transformer_blocks.0.attn1"
CROSS = "mid_block.attentions.0.transformer_blocks.0.attn2"


def _run(pipe, **kw):
    return pipe("a red cat", num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                output_type="latent", **kw).images


def test_recording_changes_nothing_and_keys_are_timesteps():
    pipe = tiny_pipeline("sd")
    stock = _run(pipe)
    with torch.no_grad(), attnkit.attach(pipe, AttentionStore(tensors=("q", "k", "v"), kinds=("self", "cross"))):
        assert torch.equal(_run(pipe), stock)  # q/k/v only: the fused path runs the stock SDPA call
    store = AttentionStore(tensors=("q", "k", "v", "maps"), kinds=("self", "cross"))
    with torch.no_grad(), attnkit.attach(pipe, store):
        recorded = _run(pipe)
    torch.testing.assert_close(recorded, stock, atol=1e-5, rtol=1e-4)  # maps: the eager reference path
    pipe.scheduler.set_timesteps(3)
    assert store.timesteps() == sorted(int(t) for t in pipe.scheduler.timesteps)  # [1, 34, 67]
    k = store.get(SELF, 34, "k")
    assert k.shape == (2, 8, 16, 8)  # CFG: [uncond, cond], 8 heads, 16 mid-block tokens
    assert store.get(CROSS, 67, "k").shape[2] == 8  # 8 text tokens


def test_maps_equal_a_hand_softmax_of_the_recorded_q_and_k():
    pipe = tiny_pipeline("sd")
    store = AttentionStore(tensors=("q", "k", "maps"), kinds=("self", "cross"), modules="mid_block")
    with torch.no_grad(), attnkit.attach(pipe, store):
        _run(pipe)
    for name in (SELF, CROSS):
        q, k, maps = (store.get(name, 34, t) for t in ("q", "k", "maps"))
        want = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        torch.testing.assert_close(maps, want, atol=1e-6, rtol=1e-5)


def test_rows_heads_dtype_offload_and_memory_in_bytes():
    pipe = tiny_pipeline("sd")
    store = AttentionStore(tensors=("k", "v"), modules=SELF, rows=[1], heads=[0, 3], dtype="float16", offload="cpu",
                           timesteps=[34])
    with torch.no_grad(), attnkit.attach(pipe, store):
        _run(pipe)
    k = store.get(SELF, 34, "k")
    assert k.shape == (1, 2, 16, 8) and k.dtype == torch.float16 and k.device.type == "cpu"
    assert store.timesteps() == [34]
    mem = store.memory()
    assert mem["bytes"] == 2 * (1 * 2 * 16 * 8) * 2 and mem["by_tensor"] == {"k": 512, "v": 512}
    assert "MiB" in repr(store)
    with pytest.raises(KeyError, match="no 'q' for"):
        store.get(SELF, 34, "q")


def test_inversion_store_follows_the_inversion_timesteps():
    pipe = tiny_pipeline("sd")
    store = AttentionStore(tensors=("k",), modules="up_blocks")
    inv = ddim_invert(pipe, torch.zeros(1, 4, 8, 8), num_inference_steps=4, record=store)
    assert store.timesteps() == inv.timesteps and len(store.modules()) == 2


def test_bad_arguments_are_one_sentence():
    with pytest.raises(ValueError, match="tensors must be some of"):
        AttentionStore(tensors=("keys",))
    with pytest.raises(attnkit.AttachError, match="no self attention module matches"):
        attnkit.attach(tiny_pipeline("sd"), AttentionStore(modules="nothing-here"))
