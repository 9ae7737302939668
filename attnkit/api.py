"""``attnkit.attach``: wrap a loaded transformers model or diffusers pipeline with a recipe in one call.

The :class:`Handle` it returns is small: lifecycle (``remove()``, context manager, ``disabled()``), ``report()``,
``capture()`` and spans. The framework adapter (:mod:`attnkit.hooks.transformers`, :mod:`attnkit.hooks.diffusers`)
owns the runtime: where attention is reached, sequence tracking, running each attention call.

An intervention instance serves one live attachment at a time (a second attach of the same instance is refused
with one sentence; attach another instance instead). Nothing is changed on the model when anything about the
recipe is invalid.

Example:
    >>> import attnkit, torch
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> ids = torch.tensor([[1, 5, 7, 9]])
    >>> before = model(ids).logits
    >>> with attnkit.attach(model, [attnkit.get_intervention("noop")()]) as handle:
    ...     during = model(ids).logits
    >>> torch.allclose(before, during, atol=1e-5), torch.equal(before, model(ids).logits)
    (True, True)
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterable

import torch

from attnkit.capture import Capture
from attnkit.interventions.base import Intervention, mark_running, release_running
from attnkit.planning import PlanError, plan
from attnkit.report import Report


class AttachError(ValueError):
    """A recipe that cannot be attached to this model (nothing was changed)."""


class MaterialisedAttentionWarning(UserWarning):
    """``backend="auto"`` had to run some layers on the eager backend, which materialises ``[B, H, Q, K]``."""


def _warn_materialised(planned: list, requested: str) -> None:
    """Say which interventions force the N² eager path on which layers (only when ``auto`` chose it)."""
    if requested != "auto":
        return
    eager = [s for s in planned if s.backend is not None and s.backend.name == "eager"]
    if not eager:
        return
    names = sorted({e.intervention.name for s in eager for e in s.entries})
    layers = sorted({s.layer for s in eager})
    warnings.warn(
        f"attnkit: {', '.join(names)} run(s) on the eager backend on layers {layers}, which materialises the "
        "[batch, heads, queries, keys] attention matrix (hooks such as edit_scores/edit_probs need it); expect "
        "quadratic memory in the sequence length", MaterialisedAttentionWarning, stacklevel=4)


def _as_interventions(recipe) -> tuple[list[Intervention], str | None, str]:
    """Accept a Recipe, a single Intervention or a list of them."""
    if isinstance(recipe, Intervention):
        return [recipe], None, recipe.name
    if hasattr(recipe, "build_interventions"):
        return list(recipe.build_interventions()), getattr(recipe, "backend", None), getattr(recipe, "name", "recipe")
    if isinstance(recipe, (list, tuple)):
        bad = [r for r in recipe if not isinstance(r, Intervention)]
        if bad:
            raise AttachError(f"attach() got {bad[0]!r} in the intervention list; expected attnkit Intervention objects")
        return list(recipe), None, "+".join(r.name for r in recipe) or "empty"
    raise AttachError(f"attach() expects a Recipe, an Intervention or a list of them, got {type(recipe).__name__}")


def _adapter_for(obj):
    from attnkit.hooks import diffusers as dhooks
    from attnkit.hooks import transformers as thooks

    if thooks.is_transformers_model(obj):
        return thooks.TransformersAdapter(obj)
    if dhooks.is_diffusers_object(obj):
        return dhooks.DiffusersAdapter(obj)
    raise NotImplementedError(
        f"attnkit cannot attach to {type(obj).__name__}: pass a transformers PreTrainedModel (families: "
        f"{', '.join(thooks.TESTED_FAMILIES)}) or a diffusers pipeline / UNet2DConditionModel / SD3Transformer2DModel "
        f"/ FluxTransformer2DModel / DiTTransformer2DModel / PixArtTransformer2DModel."
    )


class Handle:
    """What :func:`attach` returns: ``remove()``, context manager, ``disabled()``, ``report()``, ``capture()``.

    Interventions reach the attachment through: :attr:`model`, :attr:`description`, :attr:`tracker`,
    :attr:`active`, :meth:`sites`, :meth:`capture` and :meth:`detached`."""

    def __init__(self, adapter, interventions: list[Intervention], backend: str, name: str, recipe=None):
        self.adapter = adapter
        self.recipe = recipe  # the Recipe it was attached from, when there was one
        self.interventions = interventions
        self.requested_backend = backend
        self.name = name
        self.enabled = True
        self.removed = False
        self._planned: list = []
        self._extra_hooks: list = []
        self._warned: set[str] = set()

    def __deepcopy__(self, memo):
        """Hooks of a deep-copied model may reference this handle: the copy is a removed, inert handle."""
        inert = type(self).__new__(type(self))
        inert.adapter = copy.deepcopy(self.adapter, memo)
        inert.interventions, inert.requested_backend, inert.name = [], self.requested_backend, self.name
        inert.enabled, inert.removed, inert._planned, inert._extra_hooks, inert._warned = False, True, [], [], set()
        return inert

    # ---- what interventions use -----------------------------------------------------------------------------
    @property
    def model(self):
        """The attached model or pipeline."""
        return self.adapter.model

    target_object = model  # older name

    @property
    def description(self):
        """The :class:`~attnkit.description.ModelDescription` of the attached model."""
        return self.adapter.description

    @property
    def tracker(self):
        """The :class:`~attnkit.spans.SequenceTracker` (transformers) or None (diffusers)."""
        return self.adapter.tracker

    @property
    def active(self) -> bool:
        """True while attached, outside :meth:`disabled` and outside :meth:`detached` calls."""
        return self.enabled and not self.removed and not self.adapter._detached

    def sites(self, component: str | None = None) -> list:
        """The attention sites of ``component`` (default: every component), in layer order."""
        return [s for s in self.adapter.sites if component is None or s.component == component]

    def detached(self):
        """Context manager: calls inside run the stock model and are not tracked (a method's own extra pass)."""
        return self.adapter.detached()

    def hook(self, module: torch.nn.Module, fn, *, pre: bool = False, with_kwargs: bool = False,
             always: bool = False):
        """Register ``fn`` as a forward (``pre=True``: pre-) hook on ``module`` for an intervention's work outside
        attention; return it from :meth:`~attnkit.Intervention.install` so ``remove()`` removes it.

        It runs only while this handle is :attr:`active` (``always=True``: also while disabled, e.g. to notice
        sequences that run without the method), and never in a deep copy of the model."""
        guarded = _GuardedHook(self, fn, always)
        if pre:
            return module.register_forward_pre_hook(guarded, with_kwargs=with_kwargs)
        return module.register_forward_hook(guarded, with_kwargs=with_kwargs)

    def intervention(self, name: str) -> Intervention:
        """This handle's intervention named ``name``."""
        for iv in self.interventions:
            if iv.name == name:
                return iv
        raise KeyError(f"this handle has no intervention {name!r}; it has {[iv.name for iv in self.interventions]}")

    def plan_entries(self, intervention: Intervention) -> list:
        """The :class:`~attnkit.kernels.plan.PlanEntry` of ``intervention`` on each planned module, in layer order
        (its target heads, call count and per-sequence state on that layer)."""
        return [e for site in self._planned for e in site.entries if e.intervention is intervention]

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def _install(self, planned: list) -> None:
        self._planned = planned
        try:
            self.adapter.install(self, planned)
            for iv in self.interventions:
                self._extra_hooks.extend(iv.install(self) or [])
        except Exception:
            self._remove_extra_hooks()
            self.adapter.uninstall()
            raise

    def _remove_extra_hooks(self) -> None:
        for hook in reversed(self._extra_hooks):
            hook.remove()
        self._extra_hooks = []

    def remove(self) -> None:
        """Restore the model exactly; safe to call twice."""
        if self.removed:
            return
        self._remove_extra_hooks()
        self.adapter.uninstall()
        for cap in list(self.adapter.captures):
            cap.stop()
        self.removed = True
        release_running(self.interventions, self)

    def __enter__(self) -> "Handle":
        if self.removed:
            raise AttachError(f"handle {self.name!r} was removed; call attnkit.attach(...) again to reattach")
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def disabled(self):
        """Run the stock model inside the block, without re-patching anything."""
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    # ---- captures and spans ---------------------------------------------------------------------------------
    def capture(self, layers=None, heads=None, queries="last", component: str | None = None) -> Capture:
        """Start capturing attention probabilities of the selected rows (after this handle's edits).

        ``queries``: "last" (default), "all" (full maps, N² memory), a slice, an int or a list of row indices."""
        if self.removed:
            raise AttachError(f"handle {self.name!r} was removed; nothing can be captured through it")
        if layers is not None:
            layers = [layers] if isinstance(layers, int) else list(layers)
        if heads is not None:
            heads = [heads] if isinstance(heads, int) else list(heads)
        cap = Capture(layers, heads, queries, component or self.description.default_component, _owner=self.adapter)
        self.adapter.captures.append(cap)
        return cap

    def set_span(self, name: str, spans) -> None:
        """Mark a token span (bool ``[B, N]`` or per-sample ``[(start, end)]`` over the padded ``input_ids``)
        that interventions can read as ``ctx.key_mask(name)`` from the next prefill on."""
        if self.tracker is None:
            raise AttachError("spans over token ids exist for transformers models only; diffusers calls label "
                              "their keys as 'text' and 'image' themselves")
        self.tracker.set_span(name, spans)

    def clear_spans(self) -> None:
        if self.tracker is not None:
            self.tracker.clear_spans()

    def save(self, directory) -> "Path":
        """Write this handle's recipe as ``attnkit_recipe.yaml`` into ``directory`` (e.g. next to a checkpoint
        written by ``save_pretrained``); ``attnkit.attach(model, directory)`` reads it back.

        Example:
            >>> import attnkit, tempfile
            >>> from attnkit.testing import tiny_causal_lm
            >>> from attnkit.interventions.noop import Noop
            >>> model, folder = tiny_causal_lm("llama"), tempfile.mkdtemp()
            >>> with attnkit.attach(model, [Noop(layers=[1])]) as handle:
            ...     path = handle.save(folder)
            >>> with attnkit.attach(model, folder) as again:
            ...     [(iv.name, iv.target.layers) for iv in again.interventions]
            [('noop', [1])]
        """
        from pathlib import Path

        from attnkit.recipes.loader import SAVED_RECIPE
        from attnkit.recipes.schema import Recipe

        recipe = self.recipe or Recipe.from_interventions(self.interventions, name=self.name,
                                                          backend=self.requested_backend)
        folder = Path(directory).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SAVED_RECIPE
        path.write_text(recipe.to_yaml(), encoding="utf-8")
        return path

    # ---- reporting ------------------------------------------------------------------------------------------
    def _intervention_calls(self) -> dict[int, int]:
        calls: dict[int, int] = {}
        for site in self._planned:
            for entry in site.entries:
                calls[id(entry.intervention)] = calls.get(id(entry.intervention), 0) + entry.calls
        return calls

    def _warn_idle(self, calls_at_start: dict[int, int]) -> None:
        """Warn once per intervention that had attention hooks planned but did not run during a forward."""
        if not self.active:
            return
        now = self._intervention_calls()
        for iv in self.interventions:
            if id(iv) in now and now[id(iv)] == calls_at_start.get(id(iv), 0) and iv.name not in self._warned:
                self._warned.add(iv.name)
                warnings.warn(
                    f"attnkit: intervention {iv.name!r} did not run during this forward pass (targets: "
                    f"layers={iv.target.layers!r}); check that the model uses the attention implementation "
                    f"attnkit patched and that the targeted layers run.", RuntimeWarning, stacklevel=3)

    def report(self) -> Report:
        """Which modules were patched, with which backend, and how often each intervention ran: a dict that
        prints as a table (:class:`attnkit.report.Report`)."""
        modules = [
            {"module": s.qualname, "layer": s.layer, "component": s.component, "backend": s.backend.name,
             "interventions": [e.intervention.name for e in s.entries]}
            for s in self._planned
        ]
        counts = self._intervention_calls()
        calls = {iv.name: counts.get(id(iv), 0) for iv in self.interventions}
        return Report({"recipe": self.name, "adapter": self.adapter.framework, "enabled": self.enabled,
                       "removed": self.removed, "modules": modules, "calls": calls})

    def __repr__(self) -> str:
        state = "removed" if self.removed else ("disabled" if not self.enabled else "active")
        return f"<attnkit.Handle {self.name!r} on {type(self.model).__name__}: {len(self._planned)} modules, {state}>"


class _GuardedHook:
    """A hook that runs only while its handle is active (see :meth:`Handle.hook`); deep copies are inert."""

    def __init__(self, handle: Handle, fn, always: bool):
        self.handle, self.fn, self.always = handle, fn, always

    def __call__(self, *args):
        handle = self.handle
        if handle.removed or (not self.always and not handle.active):
            return None
        return self.fn(*args)

    def __deepcopy__(self, memo):
        return _inert_hook


def _inert_hook(*args):
    return None


def attach(model_or_pipeline, recipe: Any = (), backend: str = "auto") -> Handle:
    """Attach a recipe (a :class:`~attnkit.recipes.Recipe`, a preset name, a YAML path, a folder written by
    :meth:`Handle.save`, an Intervention or a list of them) to a transformers model or diffusers pipeline.
    Nothing is changed if anything about the recipe is invalid. One model takes one handle at a time: to run
    several methods, attach one recipe listing them all (they stack in order).

    Example:
        >>> import attnkit
        >>> from attnkit.testing import tiny_causal_lm
        >>> handle = attnkit.attach(tiny_causal_lm("qwen2"), [])
        >>> handle.remove()
    """
    if isinstance(recipe, str):
        from attnkit.recipes import load_recipe

        recipe = load_recipe(recipe)
    try:
        return _attach(model_or_pipeline, recipe, backend)
    except AttachError as err:
        locate = getattr(recipe, "locate_error", None)  # a Recipe names the file, line and entry
        if locate is None:
            raise
        raise AttachError(locate(str(err))) from None


def _attach(model_or_pipeline, recipe, backend: str) -> Handle:
    interventions, recipe_backend, name = _as_interventions(recipe)
    for iv in interventions:
        owner = iv.attached_to()
        if owner is not None:
            raise AttachError(
                f"this {iv.name} instance is already attached ({owner!r}); attach another instance (for example "
                f"copy.deepcopy of it) to run the method on a second model, or remove that handle first")
    adapter = _adapter_for(model_or_pipeline)
    description = adapter.description
    for iv in interventions:
        missing = description.explain_missing(iv.name, iv.requires)
        if missing:
            raise AttachError(f"{missing}; attach it to a model that has it")
        try:
            iv.setup(description)
        except (KeyError, ValueError) as err:
            message = err.args[0] if err.args else str(err)
            raise AttachError(message if str(message).startswith(f"{iv.name}:") else f"{iv.name}: {message}") from None
    requested = recipe_backend if backend == "auto" and recipe_backend else backend
    try:
        planned = plan(adapter, interventions, requested)
    except PlanError as err:
        raise AttachError(str(err)) from None
    handle = Handle(adapter, interventions, requested, name,
                    recipe=recipe if hasattr(recipe, "build_interventions") else None)
    try:
        handle._install(planned)
    except ValueError as err:
        raise AttachError(str(err)) from None
    mark_running(interventions, handle)
    _warn_materialised(planned, requested)
    return handle


def get_intervention(name: str):
    """The intervention class registered as ``name`` ("did you mean" on typos)."""
    from attnkit.interventions import INTERVENTIONS, load_builtin

    load_builtin()
    return INTERVENTIONS.get(name)


def available_interventions() -> Iterable[str]:
    from attnkit.interventions import INTERVENTIONS, load_builtin

    load_builtin()
    return INTERVENTIONS.names()
