"""DiTCtrl — KV sharing in MM-DiT for multi-prompt video (Cai et al., CVPR 2025; repo TencentARC/DiTCtrl),
METHODS-2.md §7.

**KV sharing** (the intervention ``ditctrl``): in layers 25–29 of 30 and steps 2–24 of 50, inside each forward on a
pair of segments ``[x_k, x_{k+1}]`` (×2 with CFG: ``[u_k, u_{k+1}, c_k, c_{k+1}]``), the target rows' queries —
video **and** text tokens — attend to the source rows' keys and values over the whole joint sequence::

    out_tgt = softmax(q_tgt · k_srcᵀ / √d) · v_src           (the source rows attend normally; no mask)

K are taken after q/k LayerNorm and RoPE, as the SDPA call receives them. It is MasaCtrl's rule with every key
shared (``keys="all"``), layers counted over the joint blocks and the code's step window; it runs on the fused
path. This is the code's default (``inference.yaml`` selects ``KVSharingAdaLNMixin``).

**Mask-guided KV sharing** (``masks="auto"``, the code's ``KVSharingMaskGuidedAdaLNMixin``, METHODS-2.md §7.3):

* *maps*: in every joint layer of a forward (inside the step window), the head-mean **video→text** attention of the
  conditional rows, fp32, from the layer's own q and k (before sharing; softmax over the whole joint sequence,
  computed in chunks of video rows — never the ``[N, N]`` map, see :func:`video_text_maps`), is added to a running
  sum; the masks at layer ℓ use the mean over the layers of this forward up to and including ℓ (the code's
  ``cross_attn_sum / cross_attn_count``; a new forward starts a new sum, the code's reset after the last layer);
* *masks* (:func:`video_text_mask`): per row, sum the columns of the chosen text tokens, lay the video tokens out as
  ``[F, h, w]``, min-max normalise per frame as ``(x − min) / (max − min + 1e-6)``, binarise at
  ``mask_threshold`` (``≥``). ``M_s`` uses ``source_token_ids`` (the code's ``ref_token_idx``) on the source's
  cond row, ``M_t`` uses ``target_token_ids`` (``cur_token_idx``) on each target's own cond row; the same masks serve
  the uncond half;
* *attention* of a target row (:func:`mask_guided_bias`): two passes over the source's K/V — fg: video keys with
  ``M_s = 0`` hidden, bg: video keys with ``M_s = 1`` hidden; text rows and text columns are never masked — blended
  per query row as ``M_t·out_fg + (1 − M_t)·out_bg`` on video rows. On text rows the code blends with 1 on
  ``cur_token_idx`` and 0 elsewhere, but both passes are the same unmasked attention there, so that weight changes
  nothing. Since each pass is a softmax over its own visible keys, the pair of passes and the blend are one
  additive region bias on the shared call (exactly equal); the source rows attend normally.

Defaults of the variant: ``mask_threshold = 0.3`` and token ids ``[0]`` (the first T5 token; T5 has no BOS), both
from ``inference.yaml``. The class default in the code is ``thres = 0.1``, but every shipped entry point
(``run_multi_prompt.sh`` etc.: ``--base … configs/inference.yaml``) passes the config's ``thres`` to the mixin, and
the one shipped mask-guided case (``dark_knight.yaml``, token ids ``[0, 1, 2]``) runs on top of it, so 0.3 is what
users of the variant actually run; pass ``mask_threshold=0.1`` for the class default. Token ids index the prompt's
T5 tokens; with more than two prompts and ``n_trans > 0`` the object must sit at the same ids in every prompt (config
note). Not implemented: the code's saving of mask images (``mask_save_dir``) and attention-map visualisations. Cost:
the video→text maps are ``[P, Nv, T]`` fp32 (≈32 MB for CogVideoX-2B's pair), but the region bias is one
``[B, 1, N, N]`` fp32 tensor per shared call (≈5 GB at 480×720 with B = 4; the code builds two ``[N, N]`` masks in
the model dtype), and the maps need every joint layer up to the last shared one in the target (``edit_kv`` returns
nothing in the layers before ``start_layer``).

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

The mask-guided variant (masks of T5 token 1, "cat" / "dog", at the code's class threshold 0.1):
    >>> guided = DiTCtrl(start_layer=1, steps=None, masks="auto", source_token_ids=[1], target_token_ids=[1],
    ...                  mask_threshold=0.1)
    >>> out = multi_prompt_video(pipe, ["a cat", "a dog"], segment_frames=3, overlap=1, n_trans=0,
    ...                          num_inference_steps=2, method=guided, generator=torch.Generator().manual_seed(0))
    >>> guided.last_masks[0].shape, guided.last_masks[1].shape   # M_s [F, h, w], M_t [targets, F, h, w]
    (torch.Size([3, 4, 4]), torch.Size([1, 3, 4, 4]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.diffusion.inject import replace_kv
from attnkit.interventions.base import register_intervention
from attnkit.interventions.editing._common import EditingIntervention, block_index_layers, token_layout
from attnkit.interventions.editing.masactrl import (
    MasaCtrl,
    _region_bias_with_text,
    _token_ids,
    cross_attention_mask,
)
from attnkit.kernels.masks import query_chunk
from attnkit.targets import Target


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
                 keys: str = "all", num_steps: int | None = None, cfg: bool | None = None, masks=None,
                 source_token_ids=None, target_token_ids=None, mask_threshold: float = 0.3, **target):
        if masks not in (None, "auto"):
            raise ValueError(f"ditctrl: masks must be None (plain KV sharing) or 'auto' (the mask-guided variant, "
                             f"masks from the video-to-text attention), got {masks!r}")
        if masks is None and (source_token_ids is not None or target_token_ids is not None):
            raise ValueError("ditctrl: source_token_ids and target_token_ids apply only with masks='auto'")
        if masks == "auto" and keys != "all":
            raise ValueError("ditctrl: masks='auto' shares every key (keys='all'), as the code does")
        super().__init__(start_step=0, start_layer=start_layer, end_layer=end_layer, source=source, mode="replace",
                         keys=keys, steps=None if steps is None else list(steps), num_steps=num_steps, cfg=cfg,
                         mask_threshold=mask_threshold, **target)
        self.masks = masks
        try:
            self.source_token_ids = _token_ids([0] if source_token_ids is None else source_token_ids,
                                               "source_token_ids")
            self.target_token_ids = _token_ids([0] if target_token_ids is None else target_token_ids,
                                               "target_token_ids")
        except ValueError as error:
            raise ValueError(str(error).replace("masactrl:", "ditctrl:")) from None
        self._shared: set = set()
        self._acc: dict = {}  # masks="auto": {"call", "sum" [P, Nv, T] fp32, "count"} of the current forward

    def default_layers(self, description) -> list[int]:
        layers = block_index_layers(description, self.start_layer, self.end_layer, kinds=("joint", "self"))
        if not layers:
            n = len(block_index_layers(description, 0, kinds=("joint", "self")))
            raise ValueError(f"ditctrl: start_layer {self.start_layer} is past this model's {n} attention blocks "
                             f"(CogVideoX-2B has 30 and uses 25-29)")
        return layers

    def setup(self, model) -> None:
        EditingIntervention.setup(self, model)
        self._cross = set()
        self._shared = set(self.target.layers)
        if self.masks != "auto":
            return
        if any(self._kinds[i] != "joint" for i in self._shared):
            raise ValueError("ditctrl: masks='auto' reads the video-to-text block of a joint text-video attention; "
                             "the selected layers must all be joint-attention layers")
        # the maps accumulate over every joint layer of the forward up to the current one
        joint = block_index_layers(model, 0, kinds=("joint",))
        last = max(joint.index(i) for i in self._shared)
        self.target = Target(layers=sorted(set(joint[:last + 1]) | self._shared), heads=self.target.heads,
                             modules=None)

    def install(self, handle) -> list:
        self._acc = {}
        return super().install(handle)

    @property
    def shared_calls(self) -> int:
        return self.edited_calls

    def edit_kv(self, q, k, v, ctx):
        """Plain sharing: MasaCtrl's replacement of every key. ``masks="auto"``: record this layer's video-to-text
        map, then (in the shared layers) the target rows read the source's K/V under the fg/bg region bias."""
        if self.masks != "auto":
            return super().edit_kv(q, k, v, ctx) if ctx.layer in self._shared else None
        info = self.call
        if info is None or not self._active(info):
            return None
        if info.unit(q.shape[0]) != 1:
            raise ValueError("ditctrl: masks='auto' needs one attention row per sample (a joint video transformer)")
        image_q = ctx.query_mask("image")[0]  # [Q] bool: video queries
        image_k = ctx.key_mask("image")[0]  # [K] bool: video keys (the rest are text)
        self._record(q, k, image_q, image_k, info)
        if ctx.layer not in self._shared:
            return None
        if info.per_group < 2:
            self._calls.warn("single", "ditctrl: each guidance group holds one sample; nothing to share (the batch "
                                       "is [source, target] per group)")
            return None
        rows = info.edited_rows(q.shape[0], [i for i in range(info.per_group) if i != self.source]).to(q.device)
        src = info.source_rows(q.shape[0], self.source).to(q.device)  # [B]
        k, v = replace_kv(k, v, k[src], v[src], rows)
        m_s, m_t = self._masks(info, int(image_k.sum()))  # [1, Nv], [P, Nv]
        m_t = m_t[info.sample_of_rows(q.shape[0]) % info.per_group].to(q.device)  # each row's own sample's M_t
        bias = mask_guided_bias(m_s.to(q.device), m_t, image_q, image_k, rows)
        self.edited_calls += 1
        return q, k, v, bias

    def _record(self, q, k, image_q, image_k, info) -> None:
        """Add this layer's head-mean video-to-text map of the conditional rows to the current forward's sum."""
        if self._acc.get("call") is not info:  # a new forward: the previous one's maps are dropped
            self._acc = {"call": info, "sum": None, "count": 0}
        cond = info.edited_rows(q.shape[0], groups=[min(1, info.groups - 1)]).to(q.device)  # [B]
        maps = video_text_maps(q[cond], k[cond], image_q, image_k)  # [P, Nv, T]
        self._acc["sum"] = maps if self._acc["sum"] is None else self._acc["sum"] + maps
        self._acc["count"] += 1

    def _masks(self, info, n_video: int):
        """(M_s ``[1, Nv]``, M_t ``[P, Nv]``) from the maps accumulated in this forward so far (layers averaged)."""
        maps = self._acc["sum"] / self._acc["count"]  # [P, Nv, T]
        n_text = maps.shape[-1]
        for name, ids in (("source_token_ids", self.source_token_ids), ("target_token_ids", self.target_token_ids)):
            if max(ids) >= n_text:
                raise ValueError(f"ditctrl: {name} {ids} index past the {n_text} text tokens of the prompts")
        layout = token_layout(info, n_video)  # (F, h, w)
        m_s = video_text_mask(maps[self.source:self.source + 1], self.source_token_ids, layout,
                              self.mask_threshold)  # [1, Nv]
        m_t = video_text_mask(maps, self.target_token_ids, layout, self.mask_threshold)  # [P, Nv]
        targets = [i for i in range(m_t.shape[0]) if i != self.source]
        self.last_masks = (m_s.view(*layout).cpu(), m_t[targets].view(len(targets), *layout).cpu())
        self.mask_grid = layout
        return m_s, m_t


def mask_guided_bias(m_s: torch.Tensor, m_t: torch.Tensor, image_q: torch.Tensor, image_k: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
    """The two passes and the blend as one additive bias ``[B, 1, N, N]`` (0 / ``-inf``) for the target ``rows``
    (bool ``[B]``; other rows 0): a video query with ``M_t = 1`` sees the text keys and the video keys with
    ``M_s = 1`` (the fg pass), one with ``M_t = 0`` the text keys and the video keys with ``M_s = 0`` (the bg pass);
    text queries see every key. ``m_s [1, Nv]``, ``m_t [1|B, Nv]`` binary on the video tokens, ``image_q``/``image_k``
    bool ``[N]``. Each pass is a softmax over its own visible keys, so this equals ``M_t·out_fg + (1 − M_t)·out_bg``
    row by row; on text rows both passes are the unmasked attention, so the code's text weights (1 on
    ``cur_token_idx``, 0 elsewhere) change nothing.

    Example (METHODS-2.md §5.2's keys as two video tokens after one text token; M_s = [1, 0]; the target's video
    queries have M_t = [1, 0]):
        >>> bias = mask_guided_bias(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]),
        ...                         torch.tensor([False, True, True]), torch.tensor([False, True, True]),
        ...                         torch.tensor([True]))
        >>> bias[0, 0].tolist()   # rows: text, video fg, video bg
        [[0.0, 0.0, 0.0], [0.0, 0.0, -inf], [0.0, -inf, 0.0]]
    """
    return _region_bias_with_text(_with_text(m_t, image_q), _with_text(m_s, image_k), rows)


def _with_text(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``[R, Nv]`` video-token mask → ``[R, N]`` over the joint sequence, 2 (always visible / sees all) on text."""
    out = torch.full((mask.shape[0], image.shape[0]), 2.0, device=mask.device)
    out[:, image.to(mask.device)] = mask.float()
    return out


def video_text_maps(q: torch.Tensor, k: torch.Tensor, image_q: torch.Tensor, image_k: torch.Tensor,
                    chunk: int | None = None) -> torch.Tensor:
    """Head-mean attention of the video queries on the text keys, fp32: q ``[B, H, N, D]``, k ``[B, Hkv, N, D]``,
    ``image_q``/``image_k`` bool ``[N]`` (video positions) → ``[B, Nv, T]``. The softmax runs over every key of the
    joint sequence, in chunks of video rows (never the ``[N, N]`` map; ``chunk`` rows at a time, default: a
    ``[B, H, chunk, N]`` fp32 block within the kernels' chunk budget).

    Example (one head, [text; video]; the video query's logits are 0 on the text key and log 3 on the video key):
        >>> import math
        >>> q = torch.tensor([[0.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
        >>> k = torch.tensor([[0.0, 0.0], [math.log(3) * math.sqrt(2), 0.0]]).view(1, 1, 2, 2)   # scale 2^-½
        >>> video = torch.tensor([False, True])
        >>> round(video_text_maps(q, k, video, video).item(), 6)   # 1 / (1 + 3)
        0.25
    """
    image_q, image_k = image_q.to(q.device), image_k.to(q.device)
    qv = q[:, :, image_q].float()  # [B, H, Nv, D]
    kf = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped kv heads → one per query head
    text = ~image_k
    scale = q.shape[-1] ** -0.5
    batch, heads, n_video = qv.shape[:3]
    step = chunk or min(256, query_chunk(batch, heads, n_video, kf.shape[2]))
    out = torch.empty(batch, n_video, int(text.sum()), device=q.device)
    for r0 in range(0, n_video, step):
        probs = torch.softmax(qv[:, :, r0:r0 + step] @ kf.transpose(-1, -2) * scale, dim=-1)  # [B, H, c, N]
        out[:, r0:r0 + step] = probs[..., text].mean(1)
    return out


def video_text_mask(maps: torch.Tensor, token_ids, layout: tuple[int, int, int], threshold: float = 0.3,
                    eps: float = 1e-6) -> torch.Tensor:
    """DiTCtrl's mask (``aggregate_cross_attn_map`` then ``≥ thres``): video-to-text maps ``[P, F·h·w, T]`` → sum
    of the ``token_ids`` columns → ``[P, F, h, w]`` → min-max normalised per frame, ``(x − min) / (max − min +
    1e-6)`` → ``1`` where ``≥ threshold``, else 0 → ``[P, F·h·w]`` (MasaCtrl's :func:`cross_attention_mask`, frame
    by frame).

    Example (two frames of 2×1 tokens, token 1: frame 0 [0.5, 0.1] normalises to [1, 0], frame 1 [0.3, 0.6] to
    [0, 1], each within 1e-6):
        >>> maps = torch.tensor([[0.0, 0.5], [0.0, 0.1], [0.0, 0.3], [0.0, 0.6]]).view(1, 4, 2)
        >>> video_text_mask(maps, [1], (2, 2, 1), threshold=0.3).tolist()
        [[1.0, 0.0, 0.0, 1.0]]
    """
    frames, h, w = layout
    batch = maps.shape[0]
    per_frame = maps.reshape(1, batch * frames, h * w, maps.shape[-1])  # [1 layer, P·F images, h·w, T]
    return cross_attention_mask(per_frame, token_ids, (h, w), threshold, eps=eps).view(batch, frames * h * w)


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
