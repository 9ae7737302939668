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

The default windows (cross 0.8, self ``[0, 0.5]``) are not verified against FateZero's shipped configs; the
blend threshold ``[0.3, 0.3]`` is the configs' typical shape-edit value.

Video: on AnimateDiff the spatial layers see one row per frame (the maps are per frame, as FateZero's); the temporal
modules are left alone. Not implemented: the sparse-causal attention of FateZero's inflated SD model, the latent
blending (``blend_latents``, "not so good" in the code's comments) and the Tune-A-Video checkpoints for shape edits.
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
from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.editing._common import EditingIntervention, check_source, execution_order, token_layout
from attnkit.interventions.steering.prompt_to_prompt import (
    cross_alpha,
    equalizer_row,
    refine_mapper,
    replace_mapper,
    word_token_indices,
)

EDITS = ("refine", "replace")


@register_intervention
class FateZero(EditingIntervention, Intervention):
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
        self.fused_calls = 0
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
        self._tables, self._alpha_cache = tables, {}

    def set_source(self, source) -> None:
        """Point the method at an AttentionStore of inversion maps (or ``"self"``)."""
        self.source = check_source(source, "fatezero", "source")

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
        stored = self._stored(ctx, probs)
        if stored is None:
            self._calls.warn(("missing", ctx.timestep), f"fatezero: no stored inversion maps at timestep "
                                                        f"{ctx.timestep}; that step runs unfused")
            return probs
        cond = info.group_of_rows(probs.shape[0]).to(probs.device) == info.groups - 1  # [B]
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
    inversion = ddim_invert(pipe, z0, prompt=source_prompt, num_inference_steps=num_inference_steps,
                            guidance_scale=1.0, record=store)
    method.set_source(store)
    with torch.no_grad(), attnkit.attach(pipe, method):
        out = call_pipeline(pipe, inversion.final, target_prompt, num_inference_steps, guidance_scale)
    latents = output_latents(out)
    frames = None if output_type == "latent" else decode(pipe, latents)
    return VideoEdit(latents, frames, inversion, store, method.fused_calls)

