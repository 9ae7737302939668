"""DiTCtrl — KV sharing in MM-DiT for multi-prompt video (Cai et al., CVPR 2025; repo TencentARC/DiTCtrl),
METHODS-2.md §7.

**KV sharing** (the intervention ``ditctrl``): in layers 25–29 of 30 and steps 2–24 of 50, inside each forward on a
pair of segments ``[x_k, x_{k+1}]`` (×2 with CFG: ``[u_k, u_{k+1}, c_k, c_{k+1}]``), the target rows' queries —
video **and** text tokens — attend to the source rows' keys and values over the whole joint sequence::

    out_tgt = softmax(q_tgt · k_srcᵀ / √d) · v_src           (the source rows attend normally; no mask)

K are taken after q/k LayerNorm and RoPE, as the SDPA call receives them. It is MasaCtrl's rule with every key
shared (``keys="all"``), layers counted over the joint blocks and the code's step window; it runs on the fused
path. The mask-guided variant (``KVSharingMaskGuidedAdaLNMixin``) is not implemented.

**Multi-prompt long video** (:func:`multi_prompt_video`, the C-loop): ``S = n_prompts + n_trans·(n_prompts − 1)``
segments of ``T`` latent frames with stride ``T − overlap`` over one long latent; transition segments use the text
embedding ``w_1 c_p + w_2 c_{p+1}`` (``w_2 = (j+1)/(n_trans+1)``). Each step runs one CFG forward per adjacent pair,
blends every segment's prediction into the long latent with the triangular weights ``min(2(f+½)/T, 2 − 2(f+½)/T)``
(inner segments counted twice), divides by the accumulated weight and takes one scheduler step. diffusers' CogVideoX
schedulers predict ``v``; blending ``v`` equals blending ``x̂_0`` (affine in ``v`` with shared coefficients).
Defaults: CogVideoX-2B, 50 steps, CFG 6 (dynamic CFG is not reproduced in this loop), ``(overlap, n_trans) =
(9, 2)`` from ``inference.yaml`` (the paper used (6, 1)).

Example (the triangular weights and a tiny two-prompt video):
    >>> [round(w, 4) for w in triangular_weights(4)]
    [0.25, 0.75, 0.75, 0.25]
    >>> import torch
    >>> from attnkit.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("cogvideox")
    >>> out = multi_prompt_video(pipe, ["a cat", "a dog"], segment_frames=3, overlap=1, n_trans=0,
    ...                          num_inference_steps=3, method=DiTCtrl(start_layer=1, steps=None),
    ...                          generator=torch.Generator().manual_seed(0))
    >>> out.latents.shape, out.segments, out.shared_calls > 0      # 2 segments of 3 latent frames, 1 shared
    (torch.Size([1, 5, 4, 8, 8]), [(0, 3), (2, 5)], True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.interventions.base import register_intervention
from attnkit.interventions.editing._common import block_index_layers
from attnkit.interventions.editing.masactrl import MasaCtrl


@register_intervention
class DiTCtrl(MasaCtrl):
    name = "ditctrl"
    description = "DiTCtrl KV sharing: target segments read the source segment's joint keys and values"
    requires = frozenset({"denoiser", "joint_attention"})
    conformance = {
        "neutral": {"start_layer": 0, "steps": [0, 0]},
        "active": {"start_layer": 0, "steps": None},
        "not_applicable": {"batched": "by design the target segment reads the source segment's keys and values"}}

    def __init__(self, start_layer: int = 25, end_layer: int | None = 30, steps=(2, 25), source: int = 0,
                 keys: str = "all", num_steps: int | None = None, cfg: bool | None = None, **target):
        super().__init__(start_step=0, start_layer=start_layer, end_layer=end_layer, source=source, mode="replace",
                         keys=keys, steps=None if steps is None else list(steps), num_steps=num_steps, cfg=cfg,
                         **target)

    def default_layers(self, description) -> list[int]:
        layers = block_index_layers(description, self.start_layer, self.end_layer, kinds=("joint", "self"))
        if not layers:
            n = len(block_index_layers(description, 0, kinds=("joint", "self")))
            raise ValueError(f"ditctrl: start_layer {self.start_layer} is past this model's {n} attention blocks "
                             f"(CogVideoX-2B has 30 and uses 25-29)")
        return layers

    @property
    def shared_calls(self) -> int:
        return self.edited_calls


# ---- the multi-prompt loop ------------------------------------------------------------------------------------------
def triangular_weights(frames: int) -> list[float]:
    """``w_f = min(2(f+½)/T, 2 − 2(f+½)/T)`` for ``f = 0..T−1``.

    Example:
        >>> [round(w, 4) for w in triangular_weights(13)][:7]
        [0.0769, 0.2308, 0.3846, 0.5385, 0.6923, 0.8462, 1.0]
    """
    return [min(2 * (f + 0.5) / frames, 2 - 2 * (f + 0.5) / frames) for f in range(frames)]


def segment_layout(n_prompts: int, n_trans: int, frames: int, overlap: int) -> tuple[list, list, int]:
    """``(segments [(start, end)], text mixes [(p, w_p, q, w_q)], long length)`` of the multi-prompt layout.

    Example:
        >>> segment_layout(2, 1, 4, 2)
        ([(0, 4), (2, 6), (4, 8)], [(0, 1.0, 0, 0.0), (0, 0.5, 1, 0.5), (1, 1.0, 1, 0.0)], 8)
    """
    if not 0 <= overlap < frames:
        raise ValueError(f"ditctrl: overlap must be in [0, {frames}) for segments of {frames} frames, got {overlap}")
    mixes = []
    for p in range(n_prompts):
        mixes.append((p, 1.0, p, 0.0))
        if p + 1 < n_prompts:
            for j in range(n_trans):
                w2 = (j + 1) / (n_trans + 1)
                mixes.append((p, 1.0 - w2, p + 1, w2))
    stride = frames - overlap
    segments = [(k * stride, k * stride + frames) for k in range(len(mixes))]
    return segments, mixes, frames + (len(mixes) - 1) * stride


def blend_segments(predictions: list, segments: list, length: int, dim: int = 1) -> torch.Tensor:
    """Blend per-segment predictions (each ``[B, T, …]`` along ``dim``) into the long sequence with the triangular
    weights; a segment may appear several times (inner segments: once per pair).

    Example (METHODS-2.md §7: T = 4, overlap 2, two segments; frame 2 = 0.75·a + 0.25·b):
        >>> a, b = torch.ones(1, 4), torch.zeros(1, 4)
        >>> blend_segments([(a, 0), (b, 1)], [(0, 4), (2, 6)], 6).tolist()
        [[1.0, 1.0, 0.75, 0.25, 0.0, 0.0]]
    """
    first = predictions[0][0]
    shape = list(first.shape)
    shape[dim] = length
    total = torch.zeros(shape, dtype=torch.float32, device=first.device)
    weight = torch.zeros(length, dtype=torch.float32, device=first.device)
    for pred, k in predictions:
        start, end = segments[k]
        w = torch.tensor(triangular_weights(end - start), device=first.device)  # [T]
        view = [1] * len(shape)
        view[dim] = end - start
        total.narrow(dim, start, end - start).add_(pred.float() * w.view(view))
        weight[start:end] += w
    view = [1] * len(shape)
    view[dim] = length
    return (total / weight.clamp_min(1e-12).view(view)).to(first.dtype)


@dataclass
class MultiPromptVideo:
    latents: torch.Tensor  # [1, L, C, h, w]
    segments: list
    shared_calls: int


def multi_prompt_video(pipe, prompts: list[str], *, segment_frames: int = 13, overlap: int = 9, n_trans: int = 2,
                       num_inference_steps: int = 50, guidance_scale: float = 6.0, negative_prompt: str = "",
                       height: int | None = None, width: int | None = None, generator=None,
                       method: DiTCtrl | None = None, max_sequence_length: int | None = None) -> MultiPromptVideo:
    """A long CogVideoX video that moves through ``prompts`` (see the module docstring). ``segment_frames`` and
    ``overlap`` are in latent frames (CogVideoX-2B: 13 latent frames = 49 video frames). Returns the long latent;
    decode it with :func:`attnkit.diffusion.inversion.decode` (or segment by segment for memory)."""
    import attnkit

    if len(prompts) < 2:
        raise ValueError("ditctrl: a multi-prompt video needs at least two prompts")
    transformer = pipe.transformer
    device, dtype = transformer.device, transformer.dtype
    segments, mixes, length = segment_layout(len(prompts), n_trans, segment_frames, overlap)
    tokenizer_limit = getattr(pipe.tokenizer, "model_max_length", 226)
    max_len = max_sequence_length or min(226, int(tokenizer_limit))
    pos, neg = pipe.encode_prompt(list(prompts), [negative_prompt] * len(prompts), do_classifier_free_guidance=True,
                                  max_sequence_length=max_len, device=device, dtype=dtype)  # [P, N, C] each
    texts = [w1 * pos[p] + w2 * pos[q] for p, w1, q, w2 in mixes]  # [S] of [N, C]
    uncond = [neg[p] if w1 >= w2 else neg[q] for p, w1, q, w2 in mixes]
    spatial = getattr(pipe, "vae_scale_factor_spatial", 8)
    height = height or transformer.config.sample_height * spatial
    width = width or transformer.config.sample_width * spatial
    channels = transformer.config.in_channels
    shape = (1, length, channels, height // spatial, width // spatial)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    latents = latents * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    rotary = (pipe._prepare_rotary_positional_embeddings(height, width, segment_frames, device)
              if transformer.config.use_rotary_positional_embeddings else None)
    method = method or DiTCtrl()
    method.cfg = True
    method._calls.cfg = True  # the batch of every pair forward is [u_k, u_k+1, c_k, c_k+1]
    with torch.no_grad(), attnkit.attach(pipe, method):
        for t in pipe.scheduler.timesteps:
            preds = []
            for k in range(len(segments) - 1):
                (a0, a1), (b0, b1) = segments[k], segments[k + 1]
                pair = torch.cat([latents[:, a0:a1], latents[:, b0:b1]])  # [2, T, C, h, w]
                model_in = pipe.scheduler.scale_model_input(torch.cat([pair, pair]), t)
                text = torch.stack([uncond[k], uncond[k + 1], texts[k], texts[k + 1]])
                out = transformer(hidden_states=model_in, encoder_hidden_states=text, timestep=t.expand(4),
                                  image_rotary_emb=rotary, return_dict=False)[0].float()
                out_u, out_c = out.chunk(2)
                guided = out_u + guidance_scale * (out_c - out_u)  # [2, T, C, h, w]
                preds += [(guided[:1], k), (guided[1:], k + 1)]
            blended = blend_segments(preds, segments, length)
            latents = pipe.scheduler.step(blended, t, latents, return_dict=False)[0].to(dtype)
    return MultiPromptVideo(latents, segments, method.shared_calls)
