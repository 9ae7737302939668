"""``attnkit.attach``: wrap a loaded transformers model or diffusers pipeline with a recipe in one call.

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
import warnings
from collections import defaultdict
from typing import Any, Iterable

import torch

from attnkit.capture import Capture
from attnkit.interventions.base import AttentionContext, Intervention
from attnkit.kernels.backends import choose_backend
from attnkit.kernels.eager import eager_probs
from attnkit.kernels.plan import PlanEntry
from attnkit.spans import SequenceTracker
from attnkit.targets import TargetError

_ATTACHED: "dict[int, Handle]" = {}


class AttachError(ValueError):
    """A recipe that cannot be attached to this model (nothing was changed)."""


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
    """What :func:`attach` returns: ``remove()``, context manager, ``disabled()``, ``report()``, ``capture()``."""

    def __init__(self, obj, interventions: list[Intervention], backend: str, name: str):
        self.target_object = obj
        self.interventions = interventions
        self.requested_backend = backend
        self.name = name
        self.enabled = True
        self.removed = False
        self._captures: list[Capture] = []
        self._warned: set[str] = set()
        self._calls_at_forward_start: dict[int, int] = {}
        self._outer_depth = 0
        self.step = 0  # diffusers: denoiser calls so far
        self.text_len: int | None = None  # diffusers: encoder_hidden_states length of the current call
        self.adapter = _adapter_for(obj)
        info = self.adapter.model_info()
        self.model_info = info
        self.tracker = SequenceTracker(image_token_id=info.get("image_token_id"))
        self.entries_by_intervention: dict[int, list[PlanEntry]] = defaultdict(list)
        self._planned = self._plan(info)

    # ---- planning ---------------------------------------------------------------------------------------
    def _plan(self, info: dict):
        """Resolve every intervention's targets to plan entries per attention site, then pick each site's backend."""
        names = [iv.name for iv in self.interventions]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise AttachError(f"intervention {dupes[0]!r} appears twice in this recipe; give one entry per method")
        by_site: dict[int, tuple[Any, list[PlanEntry]]] = {}
        site_index = {(s.component, s.layer): s for s in self.adapter.sites}
        for iv in self.interventions:
            for site, entry in self._entries_for(iv, info, site_index):
                site_entries = by_site.setdefault(id(site), (site, []))[1]
                self._check_conflicts(site, site_entries, entry)
                site_entries.append(entry)
                self.entries_by_intervention[id(iv)].append(entry)
        for site, entries in by_site.values():
            site.entries = entries
            site.backend = self._backend_for(site, entries)
        return [site for site, _ in by_site.values()]

    def _entries_for(self, iv: Intervention, info: dict, site_index: dict) -> list[tuple[Any, PlanEntry]]:
        """``(site, entry)`` for each attention module ``iv`` targets; raises AttachError when none matches."""
        component = iv.component or info["default_component"]
        comp = info.get(component)
        if comp is None:
            raise AttachError(f"{iv.name}: this model has no {component!r} attention layers to target")
        try:
            iv.setup(info)
            layer_heads = iv.target.resolve(comp["num_layers"], comp["num_heads"])
        except (TargetError, ValueError) as err:
            raise AttachError(f"{iv.name}: {err}") from None
        if not iv.capabilities():
            return []  # works only through install() (e.g. a KV-cache policy): nothing to plan in attention
        found = []
        for layer, heads in layer_heads.items():
            site = site_index.get((component, layer))
            if site is None or not iv.target.matches_module(site.qualname):
                continue
            head_mask = torch.zeros(site.num_heads, dtype=torch.bool)  # [H]
            head_mask[heads] = True
            found.append((site, PlanEntry(iv, head_mask)))
        if not found:
            raise AttachError(
                f"{iv.name}: target layers={iv.target.layers!r} modules={iv.target.modules!r} matched no attention "
                f"module (valid layers 0..{comp['num_layers'] - 1}; module names look like "
                f"{next(iter(site_index.values())).qualname!r})"
            )
        return found

    def _backend_for(self, site, entries: list[PlanEntry]):
        """The backend that runs every hook of ``entries`` on this site's device (see kernels.backends)."""
        needs: dict[str, list[str]] = defaultdict(list)
        for e in entries:
            for cap in e.intervention.capabilities():
                needs[cap].append(e.intervention.name)
        if getattr(getattr(site.module, "config", None), "attn_logit_softcapping", None) is not None:
            needs["softcap"].append(f"{self.model_info.get('model_type')} (attention logit softcapping)")
        device = next(site.module.parameters(), torch.empty(0)).device
        try:
            return choose_backend(self.requested_backend, dict(needs), device)
        except (ValueError, KeyError) as err:
            raise AttachError(f"layer {site.layer}: {err}") from None

    @staticmethod
    def _check_conflicts(site, existing: list[PlanEntry], new: PlanEntry) -> None:
        if "group_factors" not in new.intervention.capabilities():
            return
        for e in existing:
            if "group_factors" in e.intervention.capabilities() and bool((e.head_mask & new.head_mask).any()):
                raise AttachError(
                    f"{e.intervention.name} and {new.intervention.name} both reweight attention groups on layer "
                    f"{site.layer} heads {torch.nonzero(e.head_mask & new.head_mask).flatten().tolist()}; they conflict. "
                    "Target disjoint heads or layers."
                )

    def _install(self) -> None:
        key = id(self.target_object)
        if key in _ATTACHED and not _ATTACHED[key].removed:
            raise AttachError(
                f"{type(self.target_object).__name__} already has an attnkit handle ({_ATTACHED[key].name!r}); "
                "call remove() on it first or attach one recipe holding all interventions"
            )
        planned = self._planned
        if not planned:  # capture-only handle: route every text layer so captures can see them
            planned = [s for s in self.adapter.sites if s.component == "text"] or list(self.adapter.sites)
        self._extra_hooks: list = []
        try:
            self.adapter.install(self, planned)
            for iv in self.interventions:
                self._extra_hooks.extend(iv.install(self) or [])
        except Exception:
            self._remove_extra_hooks()
            self.adapter.uninstall()
            raise
        _ATTACHED[key] = self

    def _remove_extra_hooks(self) -> None:
        for hook in reversed(getattr(self, "_extra_hooks", [])):
            hook.remove()
        self._extra_hooks = []

    # ---- public API ----------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the model exactly; safe to call twice."""
        if self.removed:
            return
        self._remove_extra_hooks()
        self.adapter.uninstall()
        for cap in list(self._captures):
            cap.stop()
        self.removed = True
        if _ATTACHED.get(id(self.target_object)) is self:
            del _ATTACHED[id(self.target_object)]

    def __enter__(self) -> "Handle":
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

    def capture(self, layers=None, heads=None, queries="last", component: str | None = None) -> Capture:
        """Start capturing attention probabilities of the selected rows (after this handle's edits).

        ``queries``: "last" (default), "all" (full maps, N² memory), a slice, an int or a list of row indices."""
        if layers is not None:
            layers = [layers] if isinstance(layers, int) else list(layers)
        if heads is not None:
            heads = [heads] if isinstance(heads, int) else list(heads)
        cap = Capture(layers, heads, queries, component or self.model_info["default_component"], _handle=self)
        self._captures.append(cap)
        return cap

    def set_span(self, name: str, spans) -> None:
        """Mark a token span (bool ``[B, N]`` or per-sample ``[(start, end)]`` over the padded ``input_ids``)
        that interventions can read as ``ctx.key_mask(name)`` from the next prefill on."""
        self.tracker.set_span(name, spans)

    def clear_spans(self) -> None:
        self.tracker.clear_spans()

    def report(self) -> dict:
        """Which modules were patched, with which backend, and how often each intervention ran."""
        modules = [
            {"module": s.qualname, "layer": s.layer, "component": s.component, "backend": s.backend.name,
             "interventions": [e.intervention.name for e in s.entries]}
            for s in self._planned
        ]
        calls = {iv.name: sum(e.calls for e in self.entries_by_intervention[id(iv)]) for iv in self.interventions}
        return {"recipe": self.name, "adapter": self.adapter.kind, "enabled": self.enabled, "removed": self.removed,
                "modules": modules, "calls": calls}

    def __repr__(self) -> str:
        state = "removed" if self.removed else ("disabled" if not self.enabled else "active")
        return f"<attnkit.Handle {self.name!r} on {type(self.target_object).__name__}: {len(self._planned)} modules, {state}>"

    # ---- runtime (called from the hooks) ------------------------------------------------------------------------
    def active_for(self, site) -> bool:
        return self.enabled and not self.removed and (bool(site.entries) or any(
            c.wants(site.layer, site.component) for c in self._captures))

    def _intervention_calls(self) -> dict[int, int]:
        return {id(iv): sum(e.calls for e in self.entries_by_intervention[id(iv)]) for iv in self.interventions
                if iv.capabilities()}

    def _observe(self, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        embeds = kwargs.get("inputs_embeds")
        if ids is not None and ids.dim() == 2:
            batch, new_len = ids.shape
        elif isinstance(embeds, torch.Tensor):
            ids, (batch, new_len) = None, embeds.shape[:2]
        else:
            return
        from attnkit.hooks.compat import past_length

        tracked = self.tracker.length if self.tracker.batch == batch else None
        self.tracker.observe(ids, kwargs.get("attention_mask"), past_length(kwargs, new_len, tracked), batch, new_len)

    def _pre_forward_outer(self, module, args, kwargs):
        if self._outer_depth == 0:
            self._observe(args, kwargs)  # may raise: the depth is only counted for calls that start
            self._calls_at_forward_start = self._intervention_calls()
        self._outer_depth += 1

    def _pre_forward_inner(self, module, args, kwargs):
        if self._outer_depth == 0:  # the decoder was called directly, not through the outer model
            self._observe(args, kwargs)

    def _post_forward_outer(self, module, args, kwargs, output):
        """Runs also when the forward raised (``always_call``), so a failed call never leaves the depth counted."""
        self._outer_depth = max(self._outer_depth - 1, 0)
        if self._outer_depth == 0 and self.enabled and output is not None:
            self._warn_idle()

    def _warn_idle(self) -> None:
        now = self._intervention_calls()
        for iv in self.interventions:
            if id(iv) not in now:
                continue  # no attention hook: nothing that could silently not run
            if now[id(iv)] == self._calls_at_forward_start.get(id(iv), 0) and iv.name not in self._warned:
                self._warned.add(iv.name)
                warnings.warn(
                    f"attnkit: intervention {iv.name!r} did not run during this forward pass (targets: "
                    f"layers={iv.target.layers!r}); check that the model uses the attention implementation "
                    f"attnkit patched and that the targeted layers run.",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def make_context(self, site, entry, q_len, k_len, batch, device, causal, window, query_rows=None, spans=None,
                     step=None, value=None) -> AttentionContext:
        tracker = self.tracker if self.adapter.kind == "transformers" else None
        if entry is not None and tracker is not None and entry.state.get("_sequence") != tracker.sequence_id:
            entry.state.clear()
            entry.state["_sequence"] = tracker.sequence_id
        return AttentionContext(
            layer=site.layer, module=site.module, tracker=tracker, batch=batch, num_heads=site.num_heads,
            q_len=q_len, k_len=k_len, causal=causal, device=device, window=window,
            is_prefill=tracker.last_was_prefill if tracker is not None else True,
            step=step if step is not None else (tracker.forward_index if tracker is not None else 0),
            state=entry.state if entry is not None else {}, spans=spans or {}, query_rows=query_rows,
            heads=entry.head_mask if entry is not None else None, value=value,
        )

    def _run_site(self, site, query, key, value, attention_mask, scaling, dropout, kwargs):
        """Attention for one transformers module with its plan. q [B,H,Q,D], k/v [B,Hkv,K,D] → ([B,Q,H,D], None)."""
        from attnkit.hooks.transformers import _stock_function

        batch, _, q_len, head_dim = query.shape
        k_len = key.shape[2]
        scaling = head_dim**-0.5 if scaling is None else scaling
        causal = kwargs.get("is_causal", getattr(site.module, "is_causal", True))
        window = kwargs.get("sliding_window")
        dropout = dropout if site.module.training else 0.0

        def make_ctx(entry, rows=None):
            return self.make_context(site, entry, q_len, k_len, batch, query.device, causal, window, rows, value=value)

        def stock():
            out, _ = _stock_function(site.module, site.original_impl)(
                site.module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            return out.transpose(1, 2)  # [B, H, Q, D] like the backends

        out = self._attend(site, query, key, value, attention_mask, scaling=scaling, causal=causal,
                           softcap=kwargs.get("softcap"), dropout=dropout, make_ctx=make_ctx, stock=stock,
                           call_index=self.tracker.forward_index)
        return out.transpose(1, 2).contiguous(), None  # [B, Q, H, D]

    def _attend(self, site, query, key, value, mask, *, scaling, causal, softcap, dropout, make_ctx, stock,
                call_index):
        """Run a site's plan (or the stock attention when it has none) and feed active captures → [B,H,Q,D]."""
        if site.entries:
            out = site.backend.run(query, key, value, mask, scaling=scaling, entries=site.entries, make_ctx=make_ctx,
                                   causal=causal, softcap=softcap, dropout=dropout)
            for entry in site.entries:
                entry.calls += 1
        else:
            out = stock()
        for cap in self._captures:
            if cap.wants(site.layer, site.component):
                self._capture_rows(cap, site, query, key, mask, scaling, causal, softcap, make_ctx, call_index)
        return out

    def _capture_rows(self, cap, site, query, key, mask, scaling, causal, softcap, make_ctx, call_index):
        """The selected query rows' probabilities, with this site's edits applied: [B, H, R, K]."""
        q_len, k_len = query.shape[2], key.shape[2]
        rows = cap.rows(q_len).to(query.device)
        if mask is None and causal and q_len > 1:
            from attnkit.kernels.masks import causal_allowed

            mask = causal_allowed(q_len, k_len, query.device)[None, None]  # [1, 1, Q, K]
        if mask is not None and mask.shape[-2] == q_len:
            mask = mask[..., rows, :]
        probs = eager_probs(query[:, :, rows], key, mask, scaling=scaling, entries=site.entries,
                            make_ctx=lambda e: make_ctx(e, rows), causal=False, softcap=softcap)  # [B,H,R,K]
        cap.add(site.layer, call_index, probs, rows, kind=getattr(site, "kind", "self"))

    # ---- diffusers runtime (called from the processor wrappers) -------------------------------------------------
    def _pre_forward_denoiser(self, module, args, kwargs):
        self.step += 1
        encoder = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.text_len = encoder.shape[1] if isinstance(encoder, torch.Tensor) else None
        self._calls_at_forward_start = self._intervention_calls()

    def _run_diffusers_sdpa(self, site, spans_for, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                            scale=None, enable_gqa=False):
        """One intercepted SDPA call inside a diffusers processor. q [B,H,Q,D], k/v [B,Hkv,K,D] → [B,H,Q,D]."""
        batch, num_heads, q_len, head_dim = query.shape
        k_len = key.shape[2]
        scaling = head_dim**-0.5 if scale is None else scale
        spans = {name: m[None].expand(batch, -1).to(query.device) for name, m in spans_for(k_len).items()}

        def make_ctx(entry, rows=None):
            return self.make_context(site, entry, q_len, k_len, batch, query.device, bool(is_causal), None, rows,
                                     spans=spans, step=self.step, value=value)

        def stock():
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa)

        return self._attend(site, query, key, value, attn_mask, scaling=scaling, causal=bool(is_causal), softcap=None,
                            dropout=dropout_p, make_ctx=make_ctx, stock=stock, call_index=self.step)


def attach(model_or_pipeline, recipe: Any = (), backend: str = "auto") -> Handle:
    """Attach a recipe (a :class:`~attnkit.recipes.Recipe`, a recipe name/path, an Intervention or a list of them)
    to a transformers model or diffusers pipeline. Nothing is changed if anything about the recipe is invalid.

    Example:
        >>> import attnkit
        >>> from attnkit.testing import tiny_causal_lm
        >>> handle = attnkit.attach(tiny_causal_lm("qwen2"), [])
        >>> handle.remove()
    """
    if isinstance(recipe, str):
        from attnkit.recipes import load_recipe

        recipe = load_recipe(recipe)
    interventions, recipe_backend, name = _as_interventions(recipe)
    handle = Handle(model_or_pipeline, interventions, recipe_backend if backend == "auto" and recipe_backend else backend,
                    name)
    handle._install()
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
