"""What the editing methods share: the sampling step and batch layout of each denoiser call, layer selection in
execution order, token-grid geometry, and where reference tensors come from.

**Batch layout.** A denoiser call holds ``n`` samples: ``G`` classifier-free-guidance groups (``[uncond…, cond…]``,
``G = 2`` with CFG) of ``P = n / G`` samples each. Inside an attention call the batch is ``n · u`` rows: ``u = 1``
for image layers, ``u = F`` for AnimateDiff's spatial layers (one row per frame), ``u = h·w`` for its temporal
layers. Sample ``i`` of group ``g`` owns rows ``[(g·P + i)·u, (g·P + i + 1)·u)``, so "take sample 0's keys" maps
every row to the row at the same offset in sample 0 of its group (:meth:`CallInfo.source_rows`).

**Sources** of reference tensors (:func:`resolve_source`): ``"self"`` (this call's own tensors), an int (that
sample of each CFG group), or an :class:`~attnkit.diffusion.store.AttentionStore` (looked up by module and
timestep).

Example:
    >>> info = CallInfo(step=0, num_steps=50, timestep=981.0, batch=4, groups=2)
    >>> info.source_rows(8, source=0).tolist(), info.edited_rows(8, samples=[1]).tolist()   # u = 2 rows per sample
    ([0, 1, 0, 1, 4, 5, 4, 5], [False, False, True, True, False, False, True, True])
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from attnkit.hooks.diffusers import is_temporal
from attnkit.interventions.steering._denoiser_calls import (
    WarnOnce,
    batch_size_of,
    denoisers_of,
    pipeline_of,
    scheduler_step,
    timestep_of,
)


@dataclass
class CallInfo:
    """One denoiser call, as the editing methods see it (see the module docstring)."""

    step: int  # sampling step index (0 = the first, noisiest)
    num_steps: int
    timestep: float | None
    batch: int  # samples in the denoiser call (n)
    groups: int = 1  # CFG groups (2 with classifier-free guidance)
    height: int | None = None  # latent grid of the call (tokens per side before patching / downsampling)
    width: int | None = None
    frames: int = 1

    @property
    def per_group(self) -> int:
        return max(self.batch // max(self.groups, 1), 1)

    def unit(self, rows: int) -> int:
        """Attention rows per sample in a call with ``rows`` batch rows."""
        if rows % self.batch:
            raise ValueError(f"an attention call with {rows} rows does not split into {self.batch} samples")
        return rows // self.batch

    def sample_of_rows(self, rows: int) -> torch.Tensor:
        """``[rows]`` long: the sample index (0..n-1) each attention row belongs to."""
        return torch.arange(rows) // self.unit(rows)

    def edited_rows(self, rows: int, samples=None, groups=None) -> torch.Tensor:
        """Bool ``[rows]``: rows of samples ``samples`` (indices within a group; None = all) in ``groups`` (None = all)."""
        sample = self.sample_of_rows(rows)  # [rows]
        index, group = sample % self.per_group, sample // self.per_group
        keep = torch.ones(rows, dtype=torch.bool)
        if samples is not None:
            keep &= torch.isin(index, torch.as_tensor(list(samples)))
        if groups is not None:
            keep &= torch.isin(group, torch.as_tensor(list(groups)))
        return keep

    def source_rows(self, rows: int, source: int) -> torch.Tensor:
        """``[rows]`` long: for every row, the row at the same offset in sample ``source`` of its group."""
        u = self.unit(rows)
        r = torch.arange(rows)
        sample, offset = r // u, r % u
        group = sample // self.per_group
        if not 0 <= source < self.per_group:
            raise ValueError(f"source sample {source} does not exist: each guidance group has {self.per_group} samples")
        return (group * self.per_group + source) * u + offset

    def group_of_rows(self, rows: int) -> torch.Tensor:
        """``[rows]`` long: the CFG group of each row (0 = uncond when there are 2 groups)."""
        return self.sample_of_rows(rows) // self.per_group


class _LatentsSpy:
    """Replaces a pipeline instance's ``prepare_latents`` to record how many latents the call denoises (every
    diffusers pipeline prepares its latents through it, given or drawn); ``remove()`` restores the method."""

    def __init__(self, pipe, tracker: "CallTracker"):
        self.pipe, self.tracker = pipe, tracker
        self.had_attr = "prepare_latents" in pipe.__dict__
        self.previous = pipe.__dict__.get("prepare_latents")
        self.original = getattr(pipe, "prepare_latents")
        pipe.__dict__["prepare_latents"] = self

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        latents = out[0] if isinstance(out, tuple) else out
        if isinstance(latents, torch.Tensor):
            self.tracker.latents_batch = int(latents.shape[0])
        return out

    def __deepcopy__(self, memo):
        """A deep copy of an attached pipeline gets its own stock ``prepare_latents`` (bound to the copy)."""
        import copy

        return copy.deepcopy(self.original, memo)

    def remove(self) -> None:
        if self.pipe.__dict__.get("prepare_latents") is self:
            if self.had_attr:
                self.pipe.__dict__["prepare_latents"] = self.previous
            else:
                del self.pipe.__dict__["prepare_latents"]


class CallTracker:
    """Forward pre-hooks on the denoisers that record a :class:`CallInfo` per denoiser call.

    The step comes from the pipeline's scheduler (the timestep's index in ``scheduler.timesteps``); a bare denoiser
    counts calls modulo ``num_steps``. CFG groups: ``cfg`` when given, else the denoiser batch divided by the number
    of latents the pipeline prepared (so PixArt/CogVideoX, which keep CFG in a local variable, and PAG's third
    branch are seen), else the pipeline's ``do_classifier_free_guidance``, else none."""

    def __init__(self, owner: str, num_steps: int | None = None, cfg: bool | None = None):
        self.owner, self.num_steps, self.cfg = owner, num_steps, cfg
        self.info: CallInfo | None = None
        self.calls = 0
        self.latents_batch: int | None = None
        self._pipe = None
        self.warn = WarnOnce()

    def install(self, handle) -> list:
        self._pipe = pipeline_of(handle.model)
        self.calls, self.info, self.latents_batch = 0, None, None
        hooks = [handle.hook(d, self._pre, pre=True, with_kwargs=True) for d in denoisers_of(handle.model)]
        if self._pipe is not None and hasattr(self._pipe, "prepare_latents"):
            hooks.append(_LatentsSpy(self._pipe, self))
        return hooks

    def _groups(self, batch: int) -> int:
        if self.cfg is not None:
            return 2 if self.cfg else 1
        if self.latents_batch and batch % self.latents_batch == 0:
            return batch // self.latents_batch
        cfg = None
        if self._pipe is not None:
            try:
                cfg = bool(self._pipe.do_classifier_free_guidance)
            except (AttributeError, TypeError):
                cfg = False
        return 2 if cfg else 1

    def _pre(self, module, args, kwargs):
        t = timestep_of(args, kwargs)
        located = scheduler_step(self._pipe, t) if self._pipe is not None else None
        if located is None and self._pipe is not None and t is not None:  # Flux passes timestep / 1000
            located = scheduler_step(self._pipe, t * 1000)
        if located is None:
            n = self.num_steps or 1
            if self.num_steps is None and self._pipe is None:
                self.warn("steps", f"{self.owner}: a bare denoiser has no scheduler; every call counts as step 0 "
                                   "(pass num_steps= to count calls)")
            located = (self.calls % n if self.num_steps else 0, n)
        self.calls += 1
        sample = args[0] if args and isinstance(args[0], torch.Tensor) else \
            kwargs.get("sample", kwargs.get("hidden_states"))
        batch = batch_size_of(args, kwargs) or 1
        groups = self._groups(batch)
        if batch % groups:
            groups = 1
        height = width = None
        frames = 1
        if isinstance(sample, torch.Tensor):
            if sample.dim() == 5 and type(module).__name__.startswith("UNet"):  # [B, C, F, h, w]
                frames, height, width = sample.shape[2], sample.shape[3], sample.shape[4]
            elif sample.dim() == 5:  # [B, F, C, h, w]
                frames, height, width = sample.shape[1], sample.shape[3], sample.shape[4]
            elif sample.dim() == 4:
                height, width = sample.shape[2], sample.shape[3]
            elif sample.dim() == 3:  # Flux packed [B, h·w/4, C·4]
                side = int(round(math.sqrt(sample.shape[1])))
                height = width = side
        self.info = CallInfo(step=located[0], num_steps=located[1], timestep=t, batch=batch, groups=groups,
                             height=height, width=width, frames=frames)


def execution_order(names) -> list[int]:
    """Indices of attention module ``names`` sorted as a UNet executes them (down, mid, up; diffusers registers
    ``mid_block`` after ``up_blocks``); other models keep their order.

    Example:
        >>> execution_order(["down_blocks.0.a", "up_blocks.0.a", "mid_block.a"])
        [0, 2, 1]
    """
    def rank(i: int):
        name = names[i]
        part = 0 if name.startswith("down_blocks") else 1 if name.startswith("mid_block") else \
            2 if name.startswith("up_blocks") else 0
        return part, i

    return sorted(range(len(names)), key=rank)


def spatial_self_layers(description, kinds=("self", "joint")) -> list[int]:
    """Self/joint attention layers that are not temporal, in execution order."""
    component = description.component()
    names, layer_kinds = component.names, component.kinds
    return [i for i in execution_order(names) if layer_kinds[i] in kinds and not is_temporal(names[i])]


def block_index_layers(description, start: int, end: int | None = None, kinds=("self", "joint")) -> list[int]:
    """MasaCtrl's layer numbering: the ``i``-th self-attention in execution order is transformer block ``i`` (SD-1.x:
    down 0–5, mid 6, up 7–15); returns the layers of blocks ``start ≤ i < end``."""
    layers = spatial_self_layers(description, kinds)
    return layers[start:end]


def late_self_layers(description, kinds=("self", "joint")) -> list[int]:
    """The decoder-side self-attention layers editing methods inject into by default: in a UNet the self-attention
    of the last two up blocks that have attention (SD-1.x: ``up_blocks.2``, ``up_blocks.3``, i.e. StyleID's LDM
    output blocks 6–11 and MasaCtrl's blocks 10–15); in a transformer the second half of its blocks."""
    component = description.component()
    layers = spatial_self_layers(description, kinds)
    ups = sorted({int(m.group(1)) for i in layers if (m := re.match(r"up_blocks\.(\d+)\.", component.names[i]))})
    if ups:
        keep = set(ups[-2:])
        return [i for i in layers if (m := re.match(r"up_blocks\.(\d+)\.", component.names[i])) and int(m.group(1)) in keep]
    return layers[len(layers) // 2:]


def select_layers(description, layers=None, modules: str | None = None, default=None) -> list[int]:
    """``layers`` (site indices) and/or ``modules`` (regex on module names) filtered to ``default`` when neither is
    given. Raises ValueError with one sentence when nothing remains."""
    component = description.component()
    if layers is None and modules is None:
        chosen = list(default or [])
    else:
        chosen = list(range(component.num_layers)) if layers is None else [int(i) for i in layers]
        if modules is not None:
            chosen = [i for i in chosen if re.search(modules, component.names[i])]
    if not chosen:
        raise ValueError(f"no attention module matches layers={layers!r} modules={modules!r} (module names look "
                         f"like {component.names[0]!r})")
    return chosen


def _grid(info: CallInfo | None, n_tokens: int) -> tuple[int, int] | None:
    if info is not None and info.height and info.width:
        factor = math.sqrt(info.height * info.width / n_tokens)
        h, w = round(info.height / factor), round(info.width / factor)
        if h * w == n_tokens:
            return h, w
    side = int(round(math.sqrt(n_tokens)))
    return (side, side) if side * side == n_tokens else None


def token_layout(info: CallInfo | None, n_tokens: int) -> tuple[int, int, int]:
    """``(frames, h, w)`` of ``n_tokens`` image tokens: one frame's grid (from the call's latent aspect ratio), or,
    for a video transformer attending over every frame (CogVideoX), frames × grid (frame-major), trying the latent
    frame count and its temporal patchings."""
    grid = _grid(info, n_tokens)
    if grid is not None:
        return (1,) + grid
    frames = info.frames if info is not None else 1
    for f in dict.fromkeys((frames, math.ceil(frames / 2), math.ceil(frames / 4))):
        if f > 1 and n_tokens % f == 0 and (grid := _grid(info, n_tokens // f)) is not None:
            return (f,) + grid
    raise ValueError(f"cannot lay {n_tokens} tokens out on a grid of this call's latent size")


def token_grid(info: CallInfo | None, n_tokens: int) -> tuple[int, int]:
    """``(h, w)`` of an image-token grid with ``n_tokens`` tokens (one frame), from the call's latent aspect ratio."""
    frames, h, w = token_layout(info, n_tokens)
    if frames != 1:
        raise ValueError(f"{n_tokens} tokens span {frames} frames; use token_mask() for video tokens")
    return h, w


def token_mask(mask: torch.Tensor, info: CallInfo | None, n_tokens: int, mode: str = "nearest") -> torch.Tensor:
    """A ``[h, w]`` mask on this call's ``n_tokens`` image tokens → ``[n_tokens]`` (repeated over the frames of a
    video transformer's tokens)."""
    from attnkit.diffusion.inject import resize_token_mask

    frames, h, w = token_layout(info, n_tokens)
    return resize_token_mask(mask, h, w, mode=mode)[0].repeat(frames)


def resolve_source(source, ctx, tensor: str, names, x: torch.Tensor, info: CallInfo | None):
    """The reference ``tensor`` ("q", "k" or "v") for this call → ``[B|rows, H, N, D]`` or None (nothing stored).

    ``x`` is this call's own tensor; ``source`` is "self", an int sample index, or an AttentionStore."""
    if isinstance(source, str):
        if source != "self":
            raise ValueError(f"a reference source is 'self', a sample index or an AttentionStore, got {source!r}")
        return x
    if isinstance(source, int):
        if info is None:
            raise ValueError("a sample-index reference needs the denoiser call's batch (attach to a denoiser)")
        return x[info.source_rows(x.shape[0], source).to(x.device)]
    if ctx.timestep is None or not source.has(names[ctx.layer], ctx.timestep):
        return None
    return source.get(names[ctx.layer], ctx.timestep, tensor).to(device=x.device, dtype=x.dtype)


def check_source(source, owner: str, what: str):
    """Validate a reference source at construction (one sentence for the user)."""
    from attnkit.diffusion.store import AttentionStore

    if isinstance(source, bool) or not (source == "self" or isinstance(source, (int, AttentionStore))):
        raise ValueError(f"{owner}: {what} must be 'self', a sample index or an AttentionStore, got {source!r}")
    return source


def in_steps(step: int, num_steps: int, steps) -> bool:
    """Is sampling step ``step`` (of ``num_steps``) selected? ``steps``: None (all); a pair ``[a, b]`` = the window
    ``a ≤ step < b`` of step indices (ints) or of fractions (floats: ``int(a·N) ≤ step < int(b·N)``); any other list
    = those step indices.

    Example:
        >>> in_steps(4, 50, [4, 50]), in_steps(3, 50, [4, 50]), in_steps(9, 50, [0.0, 0.2]), in_steps(10, 50, [0.0, 0.2])
        (True, False, True, False)
        >>> in_steps(2, 50, [0, 2, 5])
        True
    """
    if steps is None:
        return True
    steps = list(steps)
    if len(steps) == 2:
        a, b = steps
        if isinstance(a, float) or isinstance(b, float):
            return int(a * num_steps) <= step < int(b * num_steps)
        return a <= step < b
    return step in steps


def check_steps(steps, owner: str):
    """Validate a ``steps`` argument (see :func:`in_steps`) with one sentence."""
    if steps is None:
        return None
    if not isinstance(steps, (list, tuple)) or not steps or not all(isinstance(s, (int, float)) for s in steps):
        raise ValueError(f"{owner}: steps must be None, a window [a, b) (step indices, or fractions of the steps) "
                         f"or a list of step indices, got {steps!r}")
    return list(steps)


class EditingIntervention:
    """Mixin of the editing methods: a :class:`CallTracker`, the model's module names and kinds, and the layer
    choice (``layers``/``modules`` given by the user, else :meth:`default_layers`)."""

    #: set by subclasses: the Intervention ``name`` used in messages
    def _init_editing(self, num_steps: int | None, cfg: bool | None) -> None:
        self.num_steps, self.cfg = num_steps, cfg
        self._calls = CallTracker(self.name, num_steps=num_steps, cfg=cfg)
        self._names: tuple = ()
        self._kinds: tuple = ()

    def default_layers(self, description) -> list[int]:
        return late_self_layers(description)

    def setup(self, model) -> None:
        from attnkit.targets import Target

        component = model.component(self.component)
        self._names, self._kinds = component.names, component.kinds
        self._temporal = set(model.extra.get("temporal_layers", ()))
        layers = select_layers(model, self.target.layers, self.target.modules, self.default_layers(model))
        self.target = Target(layers=layers, heads=self.target.heads, modules=None)

    def install(self, handle) -> list:
        return self._calls.install(handle)

    @property
    def call(self) -> CallInfo | None:
        """The current denoiser call (None before the first)."""
        return self._calls.info
