"""The intervention API: what a method may change inside one attention call.

An intervention overrides any of these hooks (all optional; each receives an :class:`AttentionContext`):

=====================  ====================================================================  ======================
hook                   meaning                                                               backends
=====================  ====================================================================  ======================
``edit_kv``            ``(q, k, v, ctx) -> (q, k, v, key_bias)`` before the backend runs:     every backend (runs
                       replace Q/K/V, or change the key set (e.g. append reference keys;      before them)
                       q keeps its shape, k/v ``[B,Hkv,K',D]``); ``key_bias`` None or an
                       additive bias broadcastable to ``[B,H,Q,K']`` (per-key weights, -inf
                       masks) merged into the call's mask; return None to leave the call as is
``query_scale``        factor on the pre-softmax scores (temperature): per head ``[H]``, or  eager, torch, triton
                       per row, any tensor broadcastable to ``[B,H,Q,1]`` (e.g. from
                       :meth:`AttentionContext.visible_keys`)
``score_bias``         additive pre-softmax bias broadcastable to ``[B,H,Q,K]``               eager, torch
``edit_scores``        any function of the scores ``[B,H,Q,K]`` (materialises them)           eager
``key_stats``          reads the attention each key gets from this call's real queries        eager, torch, triton
                       ``[B,H,K]`` (e.g. to detect sinks at prefill); returns nothing
``group_factors``      post-softmax reweighting of key groups: masses ``[B,H,Q,G]`` → factors eager, torch, triton
``edit_probs``         any function of the probabilities ``[B,H,Q,K]`` (materialises them)    eager
``edit_output``        per-head outputs ``[B,H,Q,D]`` → same shape                           eager, torch, triton
``override_mask``      blocks of (query span × key span) made visible or hidden, replacing   every backend (runs
                       the model's own mask there: a list of :class:`MaskBlock`              before them)
=====================  ====================================================================  ======================

``edit_kv`` runs once per call before any other hook, in recipe order (each entry sees the previous one's result);
later hooks, captures and the backend see the edited tensors, ``ctx.k_len`` = K' and ``ctx.value`` = the new v. When
the key count changes, the first ``K`` keys keep the model's mask and span labels, and the keys after them are
labelled ``"reference"`` (``ctx.key_mask("reference")``) and visible to every query unless ``key_bias`` says
otherwise. On a subset of heads, heads outside the target keep their own q/k/v (only a same-shape edit can be
restricted to some heads). See :mod:`attnkit.hooks.kv_edit`.

``override_mask`` runs next, also before the backend (:mod:`attnkit.hooks.mask_edit`): block by block, in recipe
order, the call's mask is replaced inside ``queries × keys`` (e.g. PINE's bidirectional attention between segments);
padding keys stay hidden. The backends then run the resulting mask exactly (an explicit ``[B, 1|H, Q, K]`` bool mask,
the size of the one transformers builds for a padded batch; no score matrix). Hooks also read the call's post-RoPE
``ctx.query`` ``[B,H,Q,D]`` and ``ctx.key`` ``[B,Hkv,K,D]`` (read-only; after ``edit_kv`` when one ran; e.g. a
decode-time key selection, or attention recomputed at other RoPE positions in ``edit_output``).

Every backend applies these under the attention mask the model built (padding, causality, sliding windows,
bidirectional image blocks, prefix or chunked masks): ``ctx.mask`` describes it, ``ctx.visible_keys()`` counts the
keys each row may attend. Group masses are computed per group (never as "1 − the other groups"), so a hook that
needs the mass of several groups should sum them rather than subtract from the total.

Edits apply only to the intervention's target heads: the framework keeps the other heads untouched, so a hook may
compute its edit for every head. ``group_factors`` works on the groups named by :meth:`Intervention.key_groups`
(group 0 = "everything else", group g = the g-th named span; a key in several spans takes the first), and the
rows are renormalised afterwards: ``p'_j = p_j c_g / Σ_g M_g c_g``. Two optional methods make these cheaper:
:meth:`Intervention.key_group_ids` returns the ids in one tensor where they come out of one computation, and
:meth:`Intervention.wants_key_stats` lets the backends skip the statistics pass on calls that do not use it. A value
that depends only on the spans (a key bias, group ids) can be computed once per forward for every layer with
:meth:`AttentionContext.per_forward`.

Example (a per-head output gain):
    >>> import torch
    >>> from attnkit.interventions.base import Intervention, register_intervention
    >>> class Gain(Intervention):
    ...     name = "doc-gain"
    ...     def __init__(self, factor=2.0, **target):
    ...         super().__init__(**target)
    ...         self.factor = factor
    ...     def edit_output(self, out, ctx):
    ...         return out * self.factor
    >>> Gain(layers=[0], heads=[1]).capabilities()
    {'edit_output'}
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from attnkit.registry import Registry
from attnkit.targets import Target

if TYPE_CHECKING:
    from attnkit.description import ModelDescription

INTERVENTIONS = Registry("intervention")

#: intervention -> weakref to the handle running it (see Intervention.attached_to); weak both ways
_RUNNING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def mark_running(interventions, handle) -> None:
    """Record that ``handle`` runs ``interventions``."""
    for iv in interventions:
        _RUNNING[iv] = weakref.ref(handle)


def release_running(interventions, handle) -> None:
    """``handle`` no longer runs ``interventions``: they may be attached again."""
    for iv in interventions:
        ref = _RUNNING.get(iv)
        if ref is not None and ref() in (handle, None):
            del _RUNNING[iv]

HOOKS = ("edit_kv", "override_mask", "query_scale", "score_bias", "edit_scores", "key_stats", "group_factors",
         "edit_probs", "edit_output")


def register_intervention(cls):
    """Class decorator: register an :class:`Intervention` subclass under its ``name``."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    INTERVENTIONS.register(cls.name, cls)
    return cls


@dataclass
class AttentionContext:
    """Everything an intervention may read about one attention call (one layer, one forward)."""

    layer: int  # layer index in the model's attention stack
    module: Any  # the attention module (read-only use)
    tracker: Any  # SequenceTracker or None (diffusers)
    batch: int
    num_heads: int
    q_len: int
    k_len: int
    causal: bool
    device: torch.device
    window: int | None = None
    is_prefill: bool = True
    step: int = 0  # diffusion denoising step or forward index
    timestep: float | None = None  # diffusion: the scheduler timestep the denoiser was called with (None elsewhere)
    state: dict = field(default_factory=dict)  # per (intervention, layer), reset at each prefill
    spans: dict = field(default_factory=dict)  # extra [B, K] key masks (e.g. diffusers text/image)
    query_rows: torch.Tensor | None = None  # subset of query rows (captures)
    heads: torch.Tensor | None = None  # [H] bool: this intervention's target heads
    query: torch.Tensor | None = None  # [B, H, Q, D] the call's queries as the model gave them (post-RoPE; read-only)
    key: torch.Tensor | None = None  # [B, Hkv, K, D] the call's keys, cache included (post-RoPE; read-only)
    value: torch.Tensor | None = None  # [B, Hkv, K, D] the call's values (read-only; e.g. identity attention = v)
    mask: Any = None  # the call's attention mask as the backend runs it (attnkit.kernels.masks.KeyMask); set by it
    orig_k_len: int | None = None  # the key count before an ``edit_kv`` changed it (None: unchanged)

    def _positions(self, n: int) -> slice:
        total = self.tracker.length if self.tracker is not None else n
        return slice(total - n, total)

    def keys_of(self, tracked: torch.Tensor) -> torch.Tensor:
        """Select this call's key slots from a ``[B, T]`` tensor over all tracked positions → ``[B, K]``
        (follows pruned caches: see :meth:`attnkit.spans.SequenceTracker.provide_key_positions`)."""
        where = self.tracker.positions_for(self.layer, self.orig_k_len or self.k_len)
        if isinstance(where, slice):
            return _fit_keys(tracked[:, where], self.k_len)
        return _fit_keys(torch.gather(tracked, 1, where.to(tracked.device).clamp(0, tracked.shape[1] - 1)), self.k_len)

    def key_mask(self, name: str) -> torch.Tensor:
        """Bool ``[B, K]``: which keys of this call belong to span ``name`` (see :mod:`attnkit.spans`)."""
        if name in self.spans:
            return self.spans[name].to(self.device)
        if self.tracker is None:
            raise KeyError(f"span {name!r} is not available here; available: {sorted(self.spans)}")
        mask = self.tracker.gather(name, self.layer, self.orig_k_len or self.k_len)  # [B, K]
        return _fit_keys(mask, self.k_len).to(self.device, non_blocking=True)

    def query_mask(self, name: str) -> torch.Tensor:
        """Bool ``[B, Q]``: which queries of this call belong to span ``name``."""
        if name in self.spans:
            q_mask = self.spans[name][:, : self.orig_k_len or self.k_len][:, -self.q_len :]  # appended keys are last
        elif self.tracker is None:
            raise KeyError(f"span {name!r} is not available here; available: {sorted(self.spans)}")
        else:
            q_mask = self.tracker.gather(name, self.layer, self.q_len)  # [B, Q]: queries are the newest keys
        q_mask = q_mask.to(self.device)
        return q_mask if self.query_rows is None else q_mask[:, self.query_rows.to(self.device)]

    def per_forward(self, key, compute):
        """``compute()`` once per forward call for all the layers whose keys are the same tracked positions, e.g. a key
        bias that depends only on the spans: ``key`` names the value (include the intervention, ``self`` of the
        caller, when it depends on its settings). A layer whose cache was pruned or whose keys were edited, a capture
        re-computing rows, and a call without a tracker (diffusers) compute their own.

        Example:
            >>> from attnkit.spans import SequenceTracker
            >>> tracker = SequenceTracker(); tracker.observe(torch.tensor([[4, 5, 6]]), None, past_length=0)
            >>> ctx = AttentionContext(layer=0, module=None, tracker=tracker, batch=1, num_heads=2, q_len=3, k_len=3,
            ...                        causal=True, device=torch.device("cpu"))
            >>> calls = []
            >>> [ctx.per_forward("ones", lambda: calls.append(1) or torch.ones(3)).sum().item() for _ in range(2)]
            [3.0, 3.0]
            >>> len(calls)
            1
        """
        tracker = self.tracker
        if (tracker is None or self.orig_k_len is not None or self.query_rows is not None
                or self.layer in tracker.key_position_providers):
            return compute()
        return tracker.memo((key, self.batch, self.k_len, str(self.device)), compute)

    def group_ids(self, names: tuple) -> torch.Tensor:
        """``[B, K]`` long group id per key: g+1 for the first span in ``names`` containing it, 0 otherwise.
        An entry of ``names`` is a span name or a callable ``ctx -> bool [B, K]`` (a computed span). Ids from span
        names alone are computed once per forward (:meth:`per_forward`)."""
        if all(isinstance(name, str) for name in names):
            return self.per_forward(("group_ids", tuple(names)), lambda: self._group_ids(names))
        return self._group_ids(names)

    def _group_ids(self, names: tuple) -> torch.Tensor:
        ids = torch.zeros(self.batch, self.k_len, dtype=torch.long, device=self.device)  # [B, K]
        for g in reversed(range(len(names))):
            mask = names[g](self) if callable(names[g]) else self.key_mask(names[g])  # [B, K] bool
            ids = torch.where(mask.to(self.device), torch.full_like(ids, g + 1), ids)
        return ids

    def visible_keys(self) -> torch.Tensor:
        """``[B|1, H|1, Q]`` fp32: how many keys each query row of this call may attend under the model's mask
        (real keys only: padding, causality, sliding windows and bidirectional blocks are all accounted for).
        With ``query_rows`` set (a capture re-computing some rows) the rows are those rows."""
        if self.mask is None:
            raise RuntimeError("visible_keys() needs the backend to describe the call's mask (ctx.mask is unset)")
        return self.mask.visible_counts(self.device)

    @property
    def key_padding(self) -> torch.Tensor | None:
        """Bool ``[B, K]``, True for real tokens; None when nothing is padded / unknown."""
        if self.tracker is None or self.tracker.ids is None:
            return None
        return self.key_mask("real")


class Intervention:
    """Base class of all interventions; see the module docstring for the hooks.

    An instance serves one live attachment at a time: :func:`attnkit.attach` refuses, with one sentence, an
    instance that another live handle runs (attach a second instance, e.g. ``copy.deepcopy(iv)``, to use the same
    method on a second model). :meth:`setup` and :meth:`install` run again at every attachment, so the runtime state
    they keep on ``self`` belongs to the current attachment; whatever an observer records stays readable on the
    instance after ``remove()``."""

    name: ClassVar[str] = ""
    #: prefer this in error messages and reports
    description: ClassVar[str] = ""
    #: what the model must offer (see :data:`attnkit.description.FEATURES`), plus ``"span:NAME"`` for user spans
    #: the method reads (checked when the span is first needed); attach refuses a model lacking a feature
    requires: ClassVar[frozenset] = frozenset()
    #: a named slot only one intervention of a recipe may fill (e.g. "kv-cache" for cache policies)
    exclusive: ClassVar[str | None] = None
    #: parameters for the conformance suite: ``neutral`` must reproduce the stock model, ``active`` must change it
    #: (None: the method has no such setting; the suite reports those cells as not applicable)
    conformance: ClassVar[dict] = {"neutral": None, "active": {}}

    def __init__(self, layers=None, heads=None, modules: str | None = None, component: str | None = None):
        self.target = Target(layers=layers, heads=heads, modules=modules)
        self.component = component

    def __init_subclass__(cls, **kwargs):
        """Record the arguments each instance was built with (:meth:`config`), whatever its ``__init__``."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_init(cls.__dict__["__init__"])

    def config(self) -> dict:
        """The arguments this instance was built with (its subclass's constructor parameters, targets included):
        ``type(self)(**iv.config())`` builds an equal intervention, and recipes are saved from it."""
        return dict(self.__dict__.get("_init_arguments", {}))

    # ---- introspection ----------------------------------------------------------------------------------
    def capabilities(self) -> set[str]:
        """The hooks this intervention overrides (what a backend must support)."""
        return {h for h in HOOKS if getattr(type(self), h) is not getattr(Intervention, h)}

    def key_groups(self) -> tuple:
        """Span names defining the groups for :meth:`group_factors` (group 0 is everything else).

        An entry may also be a callable ``ctx -> bool [B, K]`` for masks computed per layer at run time (e.g. VAR's
        sink tokens, found from each layer's hidden states)."""
        return ()

    def key_group_ids(self, ctx: AttentionContext) -> torch.Tensor:
        """``[B, K]`` long: the group of each key of this call for :meth:`group_factors` (0 … ``len(key_groups())``).
        The default reads :meth:`key_groups` (:meth:`AttentionContext.group_ids`); override it when the ids come out
        of one computation (e.g. ACT's per-head sink patterns) rather than one mask per group.

        Example:
            >>> from attnkit.spans import SequenceTracker
            >>> tracker = SequenceTracker(); tracker.observe(torch.tensor([[4, 5, 6]]), None, past_length=0)
            >>> ctx = AttentionContext(layer=0, module=None, tracker=tracker, batch=1, num_heads=1, q_len=3, k_len=3,
            ...                        causal=True, device=torch.device("cpu"))
            >>> class FirstToken(Intervention):
            ...     def key_groups(self):
            ...         return ("first",)
            >>> FirstToken().key_group_ids(ctx).tolist()
            [[1, 0, 0]]
        """
        return ctx.group_ids(self.key_groups())

    def wants_key_stats(self, ctx: AttentionContext) -> bool:
        """Whether :meth:`key_stats` would use this call's statistics (default: always). The backends skip the column
        pass when it says False, e.g. ACT, whose sinks are fixed at the prefill, on every decoding step."""
        return True

    def attached_to(self):
        """The live :class:`~attnkit.api.Handle` running this instance, or None."""
        ref = _RUNNING.get(self)
        handle = ref() if ref is not None else None
        return handle if handle is not None and not handle.removed else None

    def setup(self, model: "ModelDescription") -> None:
        """Called once at attach time, on the bound copy, with the model's
        :class:`~attnkit.description.ModelDescription`; raise ValueError with one sentence when the model does not
        fit (attach turns it into an AttachError and changes nothing)."""

    def install(self, handle) -> list:
        """Called once after attach with the :class:`~attnkit.api.Handle`; return removable hooks
        (objects with ``.remove()``) for work outside attention calls — e.g. dropping tokens between decoder
        layers (FastV) or hooking a vision tower. They are removed by ``handle.remove()``."""
        return []

    def describe(self) -> str:
        params = {k: v for k, v in vars(self).items() if k not in ("target",) and not k.startswith("_")}
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in params.items())})"

    # ---- hooks: override what you need ------------------------------------------------------------------
    def edit_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext):
        # q [B,H,Q,D], k/v [B,Hkv,K,D] -> (q [B,H,Q,D], k [B,Hkv,K',D], v [B,Hkv,K',D], key_bias or None) or None
        raise NotImplementedError

    def override_mask(self, ctx: AttentionContext) -> "list[MaskBlock] | None":  # -> blocks replacing the mask
        raise NotImplementedError

    def query_scale(self, ctx: AttentionContext) -> torch.Tensor | None:  # -> [H] or broadcastable [B,H,Q,1]
        raise NotImplementedError

    def score_bias(self, ctx: AttentionContext) -> torch.Tensor | None:  # -> broadcastable [B,H,Q,K]
        raise NotImplementedError

    def edit_scores(self, scores: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:  # [B,H,Q,K]
        raise NotImplementedError

    def key_stats(self, col_mass: torch.Tensor, ctx: AttentionContext) -> None:  # [B,H,K]
        raise NotImplementedError

    def group_factors(self, mass: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:  # [B,H,Q,G]
        raise NotImplementedError

    def edit_probs(self, probs: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:  # [B,H,Q,K]
        raise NotImplementedError

    def edit_output(self, out: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:  # [B,H,Q,D]
        raise NotImplementedError


@dataclass
class MaskBlock:
    """One block of an :meth:`Intervention.override_mask` result: every (query, key) pair with ``queries[b, i]`` and
    ``keys[b, j]`` True is made visible (``allow=True``) or hidden (``allow=False``), whatever the model's mask says.

    ``queries`` is bool ``[B, Q]`` over this call's queries (:meth:`AttentionContext.query_mask`), ``keys`` bool
    ``[B, K]`` over its keys (:meth:`AttentionContext.key_mask`). Padding keys are never made visible.

    Example (segments 0 and 1 see each other: two blocks):
        >>> a = torch.tensor([[False, True, True, False]]); b = torch.tensor([[False, False, False, True]])
        >>> blocks = [MaskBlock(a, b), MaskBlock(b, a)]
        >>> blocks[0].allow, tuple(blocks[1].keys.shape)
        (True, (1, 4))
    """

    queries: torch.Tensor  # [B, Q] bool
    keys: torch.Tensor  # [B, K] bool
    allow: bool = True


def _fit_keys(mask: torch.Tensor, k_len: int) -> torch.Tensor:
    """``[B, K0]`` → ``[B, k_len]``: keys an ``edit_kv`` appended get False (they are in no tracked span)."""
    if mask.shape[-1] >= k_len:
        return mask[..., :k_len]
    return torch.nn.functional.pad(mask, (0, k_len - mask.shape[-1]), value=False)


def _recording_init(init):
    """Wrap a subclass ``__init__`` so that the outermost call stores its bound arguments on the instance."""
    import functools
    import inspect

    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if "_init_arguments" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            arguments = {}
            for name, value in list(bound.arguments.items())[1:]:
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)
                else:
                    arguments[name] = value
            self.__dict__["_init_arguments"] = arguments
        init(self, *args, **kwargs)

    return __init__


def key_group_ids(ctx: AttentionContext, names: tuple) -> torch.Tensor:
    """``[B, K]`` long group id per key; see :meth:`AttentionContext.group_ids`."""
    return ctx.group_ids(names)
