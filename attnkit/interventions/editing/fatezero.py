"""FateZero — attention fusion for zero-shot video editing (Qi et al., ICCV 2023; repo ChenyangQiQi/FateZero),
METHODS-2.md §5.4.

1. The source video is DDIM-inverted (Convention A, **source prompt, conditional only**) while an
   :class:`~attnkit.diffusion.store.AttentionStore` keeps the attention probabilities of every self- and
   cross-attention call with at most ``max_queries`` queries (32² at 512 px: a quarter of the latent grid), per
   frame, under the timestep.
2. Editing starts from the inverted latent with the **target** prompt only (CFG doubles it); the source branch is
   never re-run: its maps come from the store at the same timestep. In the **conditional half** of those layers:

   * cross-attention, every step: ``A ← α_tok·Edit(A_inv, A) + (1 − α_tok)·A`` with Prompt-to-Prompt's ``refine``
     (default) or ``replace`` edit and cross-replace window ``α_tok`` over ``N + 1`` rows (METHODS.md §2.2);
   * self-attention, steps ``int(N·a) ≤ k < int(N·b)``: ``A[i] ← M_i·A[i] + (1 − M_i)·A_inv[i]`` — without
     ``blend_words`` ``M ≡ 0``, a full replacement by the inversion's map;
   * ``M`` (per frame) from the source inversion's cross-attention of the blend words at the same step: the stored
     maps with ``blend_queries`` queries (16² at 512 px; default a sixteenth of the latent grid), the words' token
     columns summed, averaged over heads and layers, 3×3 max-pooled, nearest-upsampled to the layer's grid, divided by
     the frame's maximum and thresholded at ``blend_th`` (``[2, 2]``: ``M ≡ 0``).

3. **Sparse-causal self-attention** (``sparse_causal``, opt-in, default ``None`` = off): FateZero's inflated SD
   model makes each frame's self-attention read the keys and values of the frames listed in ``sparse_causal``
   (``'mid'`` → frame ``(F − 1)//2``, ``'first'`` → frame 0, an int ``k`` → frame ``f + k`` clipped to
   ``[0, F − 1]``; the frame's own keys only when listed; :func:`key_frames`), in the spatial self-attention layers
   with at least ``least_sc_channel`` (640) channels; narrower layers keep per-frame self-attention. It runs as an
   ``edit_kv`` on q/k/v before the backend, so it needs no eager path of its own (fused backends run it; only the
   fusion's ``edit_probs`` does). ``sparse_causal=True`` takes the shipped
   configs' ``['mid']`` (as ``blend_th`` takes the configs' value); FateZero's code default is ``[-1, 'first']``.
   Off by default because AnimateDiff already has temporal layers. The frames: a video UNet's frames of one sample
   (AnimateDiff: one row per frame), or, on an image UNet, the samples of one guidance group (a video run as a batch
   of frames, as FateZero's inflated SD). :func:`edit_video` inverts with the same sparse-causal attention
   (:class:`SparseCausalAttention`), and the store keeps each sparse-causal call's key frames as ``"key_frames"``
   ``[F, n]`` next to its maps ``[F, H, Q, n·K]``; the fusion skips (with a warning) maps made with other key frames.
4. **Latent blending** (``blend_latents=True``, needs ``blend_words``; :func:`edit_video` only, as it needs the
   inversion's latents): after each step ``k`` with ``a ≤ k/N ≤ b`` (``blend_latents_steps``, default
   ``[0.2, 0.8]``), ``x ← x_inv + (M_s ∪ M_t)·(x − x_inv)``: ``x_inv`` the inversion latent at the level the step
   lands on, ``M_s`` the mask above (threshold ``blend_th[0]``) from the source words' stored inversion maps,
   ``M_t`` the same from the target words' (``blend_words[1]`` when given as ``[[source words], [target words]]``)
   cross-attention of this step before the fusion, both nearest-upsampled to the latent grid. The code comments call
   it "not so good"; the inclusive window and the target maps taken before the fusion follow P2P's LocalBlend and
   are not checked against FateZero's code.

The default windows (cross 0.8, self ``[0, 0.5]``) are not verified against FateZero's shipped configs; the
blend threshold ``[0.3, 0.3]`` is the configs' typical shape-edit value.

Video: on AnimateDiff the spatial layers see one row per frame (the maps are per frame, as FateZero's); the temporal
modules are left alone. Not implemented: the Tune-A-Video checkpoints for shape edits, P2P's ``substruct_words``
of the latent blend, and FateZero's call-order store keys (the store is keyed by module and timestep).
The edit needs probabilities, so the fused layers run on the eager path (``≤ 32²`` queries keeps that affordable).

Example (a tiny AnimateDiff video: invert with the source prompt, edit towards the target):
    >>> import torch
    >>> from attnkit.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("animatediff")
    >>> video = torch.rand(1, 4, 3, 8, 8) * 2 - 1                            # [B, F, 3, H, W]
    >>> out = edit_video(pipe, video, "a cat", "a red cat", num_inference_steps=3, max_queries=64)
    >>> out.latents.shape, out.fused_calls > 0, out.store.memory()["by_tensor"].keys()
    (torch.Size([1, 4, 4, 8, 8]), True, dict_keys(['maps']))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.diffusion.inject import blend_maps
from attnkit.diffusion.store import timestep_key
from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.editing._common import (
    EditingIntervention,
    check_source,
    execution_order,
    spatial_self_layers,
    token_layout,
)
from attnkit.interventions.steering.prompt_to_prompt import (
    cross_alpha,
    equalizer_row,
    refine_mapper,
    replace_mapper,
    word_token_indices,
)

EDITS = ("refine", "replace")
#: ``sparse_causal=True``: the shipped configs' key frames (FateZero's code default is ``[-1, "first"]``)
CONFIG_INDEX = ("mid",)


def check_index(index) -> list:
    """A ``sparse_causal`` key-frame list: ``True`` → the configs' ``['mid']``; a single entry → a list; each entry
    ``'mid'``, ``'first'`` or an int frame offset."""
    if index is True:
        return list(CONFIG_INDEX)
    if isinstance(index, (str, int)) and not isinstance(index, bool):
        index = [index]
    if not isinstance(index, (list, tuple)) or not index or \
            not all(e in ("mid", "first") or (isinstance(e, int) and not isinstance(e, bool)) for e in index):
        raise ValueError(f"fatezero: sparse_causal must be None, True or a list of 'mid', 'first' and int frame "
                         f"offsets, got {index!r}")
    return list(index)


def key_frames(index, num_frames: int) -> torch.Tensor:
    """The key frames of every frame under FateZero's sparse-causal attention → ``[F, n]`` long (row ``f``: the
    frames whose keys and values frame ``f`` reads, in the order of ``index``): ``'mid'`` → ``(F − 1)//2``,
    ``'first'`` → 0, an int ``k`` → ``f + k`` clipped to ``[0, F − 1]``. The frame's own keys only when listed
    (``0``, or a clipped offset that lands on it); duplicates are kept, so every frame reads ``n`` frames.

    Example (4 frames; the code default ``[-1, 'first']``: frame 0's previous frame is clipped to 0):
        >>> key_frames(["mid"], 4).flatten().tolist(), key_frames([-1, "first"], 4).tolist()
        ([1, 1, 1, 1], [[0, 0], [0, 0], [1, 0], [2, 0]])
    """
    f = torch.arange(num_frames)
    cols = []
    for e in check_index(index):
        if e == "mid":
            cols.append(torch.full_like(f, (num_frames - 1) // 2))
        elif e == "first":
            cols.append(torch.zeros_like(f))
        else:
            cols.append((f + int(e)).clamp(0, num_frames - 1))
    return torch.stack(cols, 1)


def sparse_causal_kv(k: torch.Tensor, v: torch.Tensor, frames: torch.Tensor):
    """Sparse-causal keys and values of a batch of videos: k/v ``[V·F, H, K, D]`` (``F`` consecutive rows per video,
    one per frame), ``frames`` ``[F, n]`` from :func:`key_frames` → ``[V·F, H, n·K, D]``, row ``v·F + f`` holding
    the keys (values) of frames ``frames[f, 0], …, frames[f, n−1]`` of video ``v``, concatenated in that order."""
    rows, num_frames, n = k.shape[0], frames.shape[0], frames.shape[1]
    if rows % num_frames:
        raise ValueError(f"fatezero: {rows} attention rows do not split into videos of {num_frames} frames")
    base = torch.arange(rows, device=k.device) // num_frames * num_frames  # [rows] first row of each video
    index = base[:, None] + frames.to(k.device).repeat(rows // num_frames, 1)  # [rows, n]

    def gather(x):
        return x[index].transpose(1, 2).reshape(rows, x.shape[1], n * x.shape[2], x.shape[3])

    return gather(k), gather(v)


class _SparseCausal:
    """FateZero's sparse-causal self-attention as an ``edit_kv`` (shared by :class:`FateZero` and the inversion's
    :class:`SparseCausalAttention`). Needs ``sparse_causal``, ``least_sc_channel`` and the EditingIntervention
    state."""

    def _channels(self, ctx, q) -> int:
        """The layer's channel count (diffusers ``Attention.query_dim``; else its heads × head dim)."""
        dim = getattr(ctx.module, "query_dim", None)
        if dim is None:
            dim = getattr(getattr(ctx.module, "to_q", None), "in_features", None)
        return int(dim) if dim is not None else (q.shape[1] * q.shape[-1] if q is not None else 0)

    def _video_frames(self, rows: int) -> int | None:
        """Frames per video in a self-attention call with ``rows`` batch rows: a video UNet's rows per sample
        (AnimateDiff: one row per frame), or, for an image UNet, the samples of one guidance group (a video run as
        a batch of frames, as FateZero's inflated SD)."""
        info = self.call
        if info is None:
            return None
        unit = info.unit(rows)
        if info.frames > 1:
            return unit
        return info.per_group if unit == 1 else None

    def _selection(self, ctx, rows: int, q=None) -> torch.Tensor | None:
        """``[F, n]`` key frames of this call, or None (sparse-causal off, not a spatial self-attention, or a layer
        with fewer than ``least_sc_channel`` channels)."""
        if not self.sparse_causal or self._kinds[ctx.layer] != "self" or ctx.layer in self._temporal:
            return None
        if self._channels(ctx, q if q is not None else ctx.query) < self.least_sc_channel:
            return None
        frames = self._video_frames(rows)
        return None if frames is None else key_frames(self.sparse_causal, frames)

    def _sparse_kv(self, q, k, v, ctx):
        frames = self._selection(ctx, q.shape[0], q)
        if frames is None:
            return None
        self.sparse_calls += 1
        if frames.shape[1] == 1 and torch.equal(frames[:, 0], torch.arange(frames.shape[0])):
            return None  # every frame reads only itself: per-frame self-attention
        k, v = sparse_causal_kv(k, v, frames)
        return q, k, v, None


@register_intervention
class FateZero(_SparseCausal, EditingIntervention, Intervention):
    name = "fatezero"
    description = "FateZero: fuse the inversion's attention maps into the edit (P2P on cross, mask-blended self)"
    requires = frozenset({"denoiser", "pipeline", "cross_attention"})
    conformance = {
        "neutral": {"source": "self", "prompts": ["a photo of a cat", "a dog on the grass"],
                    "cross_replace_steps": 0.0, "self_replace_steps": [0.0, 0.0], "max_queries": 4096},
        "active": {"source": "self", "prompts": ["a photo of a cat", "a dog on the grass"],
                   "self_replace_steps": [0.0, 1.0], "max_queries": 4096},
        "families": ("sd-pipeline",), "families_reason": "needs the pipeline's tokenizer for its prompts"}

    def __init__(self, source=None, prompts: list | None = None, edit: str = "refine",
                 cross_replace_steps: float | list | dict = 0.8, self_replace_steps: float | list = (0.0, 0.5),
                 blend_words: list | None = None, blend_th: list | tuple = (0.3, 0.3),
                 equalizer: dict | None = None, max_queries: int | None = None, blend_queries: int | None = None,
                 sparse_causal=None, least_sc_channel: int = 640, blend_latents: bool = False,
                 blend_latents_steps: list | tuple = (0.2, 0.8),
                 num_steps: int | None = None, cfg: bool | None = None, **target):
        if edit not in EDITS:
            raise ValueError(f"fatezero: edit must be one of {EDITS}, got {edit!r}")
        if prompts is not None and len(prompts) != 2:
            raise ValueError("fatezero: prompts are [source prompt, target prompt]")
        super().__init__(**target)
        self._init_editing(num_steps, cfg)
        self.source = None if source is None else check_source(source, "fatezero", "source")
        self.prompts, self.edit = (list(prompts) if prompts else None), edit
        self.cross_replace_steps = cross_replace_steps
        window = [0.0, float(self_replace_steps)] if isinstance(self_replace_steps, (int, float)) \
            else [float(x) for x in self_replace_steps]
        self.self_replace_steps = window
        self.blend_words = None if blend_words is None else list(blend_words)
        self.blend_th = tuple(float(x) for x in blend_th)
        self.equalizer = dict(equalizer or {})
        self.max_queries, self.blend_queries = max_queries, blend_queries
        self.sparse_causal = None if sparse_causal is None or sparse_causal is False else check_index(sparse_causal)
        self.least_sc_channel = int(least_sc_channel)
        self.blend_latents = bool(blend_latents)
        self.blend_latents_steps = tuple(float(x) for x in blend_latents_steps)
        if self.blend_latents and not self.blend_words:
            raise ValueError("fatezero: blend_latents needs blend_words (the latent mask is made of their maps)")
        self.fused_calls = self.sparse_calls = self.blended_steps = 0
        self._target_maps: dict = {}
        self._tables: dict = {}
        self._tokenizer = None

    # ---- planning ---------------------------------------------------------------------------------------------
    def setup(self, model) -> None:
        if self.source is None:
            raise ValueError("fatezero needs source= (an AttentionStore of the source's inversion maps; "
                             "attnkit.interventions.editing.fatezero.edit_video() builds it)")
        if self.prompts is None:
            raise ValueError("fatezero needs prompts=[source prompt, target prompt]")
        super().setup(model)

    def default_layers(self, description) -> list[int]:
        component = description.component()
        temporal = set(description.extra.get("temporal_layers", ()))
        return [i for i in execution_order(component.names) if component.kinds[i] in ("self", "cross")
                and i not in temporal]

    def install(self, handle) -> list:
        pipe = handle.description.extra.get("pipeline")
        self._tokenizer = getattr(pipe, "tokenizer", None)
        if self._tokenizer is None:
            raise ValueError("fatezero needs a pipeline with a tokenizer (its prompts are edited word by word)")
        self._build_tables()
        return super().install(handle)

    def _build_tables(self) -> None:
        tok, (source, target) = self._tokenizer, self.prompts
        T = int(tok.model_max_length)
        tables: dict = {"T": T}
        if self.edit == "replace":
            tables["M"] = replace_mapper(tok, source, target, T)  # [T, T]
        else:
            tables["mapper"], tables["a_tok"] = refine_mapper(tok, source, target, T)  # [T], [T]
        if self.equalizer:
            tables["eq"] = equalizer_row(tok, target, self.equalizer, T)
        if self.blend_words:
            words = self.blend_words[0] if isinstance(self.blend_words[0], (list, tuple)) else self.blend_words
            cols = sorted({p for w in words for p in word_token_indices(tok, source, w) if p < T})
            if not cols:
                raise ValueError(f"fatezero: blend words {words!r} do not occur in the source prompt {source!r}")
            tables["blend_cols"] = cols
            t_words = self.blend_words[1] if isinstance(self.blend_words[0], (list, tuple)) and \
                len(self.blend_words) > 1 else words
            t_cols = sorted({p for w in t_words for p in word_token_indices(tok, target, w) if p < T})
            if self.blend_latents and not t_cols:
                raise ValueError(f"fatezero: blend words {t_words!r} do not occur in the target prompt {target!r}")
            tables["target_cols"] = t_cols
        self._tables, self._alpha_cache = tables, {}

    def set_source(self, source) -> None:
        """Point the method at an AttentionStore of inversion maps (or ``"self"``)."""
        self.source = check_source(source, "fatezero", "source")

    def capabilities(self) -> set[str]:
        caps = super().capabilities()
        return caps if self.sparse_causal else caps - {"edit_kv"}

    def edit_kv(self, q, k, v, ctx):
        """Sparse-causal self-attention (``sparse_causal`` set): q ``[B,H,Q,D]``, k/v ``[B,H,K,D]`` →
        k/v ``[B,H,n·K,D]`` from the listed key frames."""
        return self._sparse_kv(q, k, v, ctx)

    # ---- the fusion -------------------------------------------------------------------------------------------
    def _limit(self, info) -> int:
        if self.max_queries is not None:
            return int(self.max_queries)
        return max(1, (info.height or 64) * (info.width or 64) // 4) if info is not None else 1024

    def _stored(self, ctx, probs):
        if self.source == "self":
            return probs
        if ctx.timestep is None or not self.source.has(self._names[ctx.layer], ctx.timestep):
            return None
        return self.source.get(self._names[ctx.layer], ctx.timestep, "maps").to(probs)

    def edit_probs(self, probs, ctx):
        """probs ``[B, H, Q, K]``; the conditional rows are fused with the stored inversion maps."""
        info = self.call
        if info is None or ctx.q_len > self._limit(info):
            return probs
        cond = info.group_of_rows(probs.shape[0]).to(probs.device) == info.groups - 1  # [B]
        if self.blend_latents and self._kinds[ctx.layer] == "cross":
            self._collect_target(probs[cond], ctx)
        stored = self._stored(ctx, probs)
        if stored is None:
            self._calls.warn(("missing", ctx.timestep), f"fatezero: no stored inversion maps at timestep "
                                                        f"{ctx.timestep}; that step runs unfused")
            return probs
        if not self._same_key_frames(ctx, probs.shape[0]):
            return probs
        current = probs[cond]  # [R, H, Q, K]
        if stored.shape != current.shape:
            self._calls.warn(("shape", ctx.layer), f"fatezero: stored maps {tuple(stored.shape)} do not match the "
                                                   f"edit's {tuple(current.shape)} at {self._names[ctx.layer]}")
            return probs
        if self._kinds[ctx.layer] == "cross":
            fused = self._fuse_cross(stored, current, info)
        elif info.step >= int(self.self_replace_steps[0] * info.num_steps) and \
                info.step < int(self.self_replace_steps[1] * info.num_steps):
            keep = self._blend_mask(ctx, info, current.shape[0], ctx.q_len, probs.device)  # [R, Q]
            fused = blend_maps(current, stored, keep)
        else:
            return probs
        self.fused_calls += 1
        out = probs.clone()
        out[cond] = fused.to(probs.dtype)
        return out

    def _same_key_frames(self, ctx, rows: int) -> bool:
        """Were the stored maps of this self-attention made with the key frames this call uses? (The inversion's
        :class:`SparseCausalAttention` records them in the store as ``"key_frames"``; none = per-frame.)"""
        if self.source == "self" or self._kinds[ctx.layer] != "self":
            return True
        slot = self.source.data.get((self._names[ctx.layer], timestep_key(ctx.timestep)), {})
        recorded, now = slot.get("key_frames"), self._selection(ctx, rows)
        if (recorded is None) != (now is None) or (now is not None and not torch.equal(recorded.cpu(), now)):
            self._calls.warn(("frames", ctx.layer), f"fatezero: the inversion's self-attention at "
                                                    f"{self._names[ctx.layer]} used other key frames "
                                                    f"({None if recorded is None else recorded.tolist()}) than this "
                                                    f"edit ({None if now is None else now.tolist()}); invert with the "
                                                    f"same sparse_causal (edit_video does). Those maps are not fused")
            return False
        return True

    def _alpha(self, num_steps: int) -> torch.Tensor:
        if num_steps not in self._alpha_cache:
            self._alpha_cache[num_steps] = cross_alpha(self._tokenizer, self.prompts[1:], self.cross_replace_steps,
                                                       num_steps, self._tables["T"])[:, 0]  # [N+1, T]
        return self._alpha_cache[num_steps]

    def _fuse_cross(self, base: torch.Tensor, rep: torch.Tensor, info) -> torch.Tensor:
        """P2P edit of the target maps ``rep`` from the source maps ``base``, both ``[R, H, Q, T]``."""
        tables = self._tables
        if base.shape[-1] != tables["T"]:
            return rep
        if self.edit == "replace":
            edited = torch.einsum("rhqw,wn->rhqn", base, tables["M"].to(base))
        else:
            a_tok = tables["a_tok"].to(base)
            edited = base[..., tables["mapper"].clamp_min(0)] * a_tok + rep * (1 - a_tok)
        if "eq" in tables:
            edited = edited * tables["eq"].to(base)
        alpha = self._alpha(info.num_steps)[min(info.step, info.num_steps)].to(base)  # [T]
        return edited * alpha + rep * (1 - alpha)

    def _blend_mask(self, ctx, info, rows: int, q_len: int, device) -> torch.Tensor:
        """``M [R, Q]`` in {0, 1}: 1 keeps the edit's self-attention row, 0 takes the inversion's."""
        if not self.blend_words or self.source == "self":
            return torch.zeros(rows, q_len, device=device)
        maps = self._blend_maps(ctx.timestep, device)  # [R, h, w] or None
        if maps is None:
            return torch.zeros(rows, q_len, device=device)
        frames, h, w = token_layout(info, q_len)
        return blend_mask(maps, (h, w), self.blend_th[0]).repeat(1, frames)  # [R, Q]

    def _blend_maps(self, timestep, device) -> torch.Tensor | None:
        """The blend words' map per frame from the stored cross-attention at ``timestep`` → ``[R, h, w]``."""
        cross = [n for n in self.source.modules() if self._kinds[self._names.index(n)] == "cross"
                 and self.source.has(n, timestep)]
        maps = [self.source.get(n, timestep, "maps") for n in cross]  # each [R, H, Q, T]
        if not maps:
            return None
        target_q = self.blend_queries or min(m.shape[2] for m in maps)
        chosen = [m for m in maps if m.shape[2] == target_q]
        if not chosen:
            return None
        cols = self._tables["blend_cols"]
        per_layer = [m[..., cols].sum(-1).mean(1).float() for m in chosen]  # [R, Q] each
        avg = torch.stack(per_layer).mean(0).to(device)  # [R, Q]
        frames, h, w = token_layout(self.call, target_q)
        return avg.view(-1, h, w)

    # ---- latent blending ----------------------------------------------------------------------------------------
    def _collect_target(self, probs, ctx) -> None:
        """Keep the target blend words' map of this cross-attention (cond rows, before the fusion) → ``[R, Q]``."""
        key = timestep_key(ctx.timestep) if ctx.timestep is not None else None
        if self._target_maps.get("t") != key:
            self._target_maps = {"t": key, "by_q": {}}
        cols = self._tables.get("target_cols")
        if cols and probs.shape[-1] == self._tables["T"]:
            word = probs[..., cols].sum(-1).mean(1).float()  # [R, Q]
            self._target_maps["by_q"].setdefault(probs.shape[2], []).append(word)

    def _target_blend_maps(self, timestep, device) -> torch.Tensor | None:
        """The target blend words' map per frame from this step's cross-attention → ``[R, h, w]``."""
        if self._target_maps.get("t") != timestep_key(timestep) or not self._target_maps["by_q"]:
            return None
        by_q = self._target_maps["by_q"]
        target_q = self.blend_queries or min(by_q)
        if target_q not in by_q:
            return None
        avg = torch.stack(by_q[target_q]).mean(0).to(device)  # [R, Q]
        frames, h, w = token_layout(self.call, target_q)
        return avg.view(-1, h, w)

    def blend_latent(self, step: int, num_steps: int, timestep, latents: torch.Tensor,
                     inverted: torch.Tensor) -> torch.Tensor:
        """FateZero's latent blending after sampling step ``step`` (0-based) of ``num_steps``, for
        ``a ≤ step/N ≤ b`` (``blend_latents_steps``): ``x ← x_inv + (M_s ∪ M_t)·(x − x_inv)``, ``M_s``/``M_t`` the
        :func:`blend_mask` (threshold ``blend_th[0]``) of the source words' stored inversion maps and of the target
        words' maps of this step (both at ``timestep``), at the latent's grid. ``latents``/``inverted``: the
        pipeline's format (``[F, C, h, w]`` for a batch of frames, ``[1, C, F, h, w]`` for AnimateDiff)."""
        a, b = self.blend_latents_steps
        if not self.blend_latents or self.source == "self" or not a <= step / max(num_steps, 1) <= b:
            return latents
        src = self._blend_maps(timestep, latents.device)
        tgt = self._target_blend_maps(timestep, latents.device)
        if src is None or tgt is None or src.shape[0] != tgt.shape[0]:
            self._calls.warn(("latent", timestep), f"fatezero: no blend-word maps at timestep {timestep}; the "
                                                    f"latent is not blended there")
            return latents
        size = tuple(latents.shape[-2:])
        th = self.blend_th[0]
        mask = ((blend_mask(src, size, th) + blend_mask(tgt, size, th)) > 0).to(latents.dtype)  # [R, h·w]
        if latents.dim() == 5:  # [B, C, F, h, w]
            mask = mask.view(latents.shape[0], 1, latents.shape[2], *size)
        else:  # [B, C, h, w]
            mask = mask.view(latents.shape[0], 1, *size)
        self.blended_steps += 1
        inverted = inverted.to(latents)
        return inverted + mask * (latents - inverted)


class SparseCausalAttention(_SparseCausal, EditingIntervention, Intervention):
    """FateZero's sparse-causal self-attention alone (no fusion), for the inversion pass: ``record`` (the inversion's
    :class:`~attnkit.diffusion.store.AttentionStore`, attached **before** this in the same recipe) gets the key
    frames of every stored sparse-causal call as ``"key_frames"`` ``[F, n]``, which :class:`FateZero` checks
    against its own. Not registered: :func:`edit_video` attaches it."""

    name = "fatezero-sparse-causal"
    description = "FateZero's sparse-causal self-attention (each frame reads the keys/values of listed frames)"
    requires = frozenset({"denoiser"})

    def __init__(self, sparse_causal=True, least_sc_channel: int = 640, record=None, num_steps: int | None = None,
                 cfg: bool | None = None, **target):
        super().__init__(**target)
        self._init_editing(num_steps, cfg)
        self.sparse_causal = check_index(sparse_causal)
        self.least_sc_channel = int(least_sc_channel)
        self.record = record
        self.sparse_calls = 0

    def default_layers(self, description) -> list[int]:
        return spatial_self_layers(description, kinds=("self",))

    def edit_kv(self, q, k, v, ctx):
        frames = self._selection(ctx, q.shape[0], q)
        if frames is not None and self.record is not None and ctx.timestep is not None:
            slot = self.record.data.get((self._names[ctx.layer], timestep_key(ctx.timestep)))
            if slot is not None:  # the store keeps this call (its edit_kv made the slot)
                slot["key_frames"] = frames.clone()
        return self._sparse_kv(q, k, v, ctx)


def blend_mask(maps: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """FateZero's mask from blend-word maps ``[R, h', w']``: 3×3 max-pool (stride 1, pad 1), nearest upsampling to
    ``size``, division by each row's maximum, ``> threshold`` → ``[R, h·w]`` float.

    Example (METHODS-2.md §5.4: 0.1 at (1,1), 0.4 at (3,3) on 4×4, threshold 0.3 → the bottom-right 2×2):
        >>> m = torch.zeros(1, 4, 4); m[0, 1, 1], m[0, 3, 3] = 0.1, 0.4
        >>> blend_mask(m, (4, 4), 0.3).view(4, 4).int().tolist()
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    pooled = torch.nn.functional.max_pool2d(maps[:, None].float(), 3, stride=1, padding=1)  # [R, 1, h', w']
    up = torch.nn.functional.interpolate(pooled, size=tuple(size), mode="nearest")[:, 0]  # [R, h, w]
    up = up / up.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (up > threshold).float().flatten(1)


# ---- the whole method -----------------------------------------------------------------------------------------------
@dataclass
class VideoEdit:
    latents: torch.Tensor
    frames: torch.Tensor | None
    inversion: object
    store: object
    fused_calls: int
    sparse_calls: int = 0  # sparse-causal self-attention calls of the edit
    blended_steps: int = 0  # steps whose latent was blended (blend_latents)


def edit_video(pipe, video, source_prompt: str, target_prompt: str, *, num_inference_steps: int = 50,
               guidance_scale: float = 7.5, max_queries: int | None = None, method: FateZero | None = None,
               store_dtype=None, offload=None, output_type: str = "pt", **method_kwargs) -> VideoEdit:
    """FateZero on ``pipe`` (AnimateDiff, or any UNet pipeline for a single image): invert ``video``
    (``[B, F, 3, H, W]`` in [-1, 1], an image ``[B, 3, H, W]``, or latents) with the source prompt while storing the
    maps, then sample the target prompt with the fusion. ``max_queries``: the largest query count stored and fused
    (default a quarter of the latent grid); other keyword arguments configure :class:`FateZero`."""
    import attnkit
    from attnkit.diffusion.inversion import call_pipeline, ddim_invert, decode, encode, output_latents
    from attnkit.diffusion.store import AttentionStore

    is_pixels = (video.dim() == 5 and video.shape[2] == 3) or (video.dim() == 4 and video.shape[1] == 3)
    z0 = encode(pipe, video) if is_pixels else video
    limit = max_queries or max(1, z0.shape[-1] * z0.shape[-2] // 4)
    method = method or FateZero(prompts=[source_prompt, target_prompt], max_queries=limit, **method_kwargs)
    store = AttentionStore(tensors=("maps",), kinds=("self", "cross"), max_queries=limit, dtype=store_dtype,
                           offload=offload)
    from attnkit.hooks.diffusers import DiffusersAdapter

    store.target.layers = method.default_layers(DiffusersAdapter(pipe).description)
    record = [store]
    if method.sparse_causal:  # the inversion runs the same sparse-causal attention; the store keeps its key frames
        record.append(SparseCausalAttention(method.sparse_causal, method.least_sc_channel, record=store))
    inversion = ddim_invert(pipe, z0, prompt=source_prompt, num_inference_steps=num_inference_steps,
                            guidance_scale=1.0, record=record)
    method.set_source(store)
    extra = {}
    if method.blend_latents:
        n = len(inversion.timesteps)

        def on_step_end(_pipe, i, t, kwargs):  # after step i the latent is at the level of inversion latent n−1−i
            inverted = inversion.latents[max(n - 1 - i, 0)]
            return {"latents": method.blend_latent(i, n, t, kwargs["latents"], inverted)}

        extra = {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]}
    with torch.no_grad(), attnkit.attach(pipe, method):
        out = call_pipeline(pipe, inversion.final, target_prompt, num_inference_steps, guidance_scale, extra)
    latents = output_latents(out)
    frames = None if output_type == "latent" else decode(pipe, latents)
    return VideoEdit(latents, frames, inversion, store, method.fused_calls, method.sparse_calls,
                     method.blended_steps)

