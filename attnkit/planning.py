"""Planning an attachment: which interventions run on which attention module, with which heads and backend.

:func:`plan` resolves every intervention's targets against the adapter's sites, refuses conflicts (two group
reweightings on the same heads) and picks one backend per site from :mod:`attnkit.kernels.backends`. It changes
nothing on the model: an invalid recipe fails here, before anything is installed.

Example:
    >>> from attnkit.testing import tiny_causal_lm
    >>> from attnkit.hooks.transformers import TransformersAdapter
    >>> from attnkit.interventions.noop import Noop
    >>> adapter = TransformersAdapter(tiny_causal_lm("llama"))
    >>> sites = plan(adapter, [Noop(layers=[1], hooks=("edit_output",))], "auto")
    >>> [(s.layer, s.backend.name) for s in sites]
    [(1, 'torch')]
"""

from __future__ import annotations

from collections import defaultdict

import torch

from attnkit.kernels.backends import choose_backend
from attnkit.kernels.plan import PlanEntry
from attnkit.targets import TargetError


class PlanError(ValueError):
    """A recipe that cannot be planned on this model (the message is one sentence for the user)."""


def plan(adapter, interventions: list, backend: str) -> list:
    """Plan ``interventions`` (already bound to this attachment) on ``adapter``'s sites → the planned sites."""
    names = [iv.name for iv in interventions]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PlanError(f"intervention {dupes[0]!r} appears twice in this recipe; give one entry per method")
    for site in adapter.sites:
        site.entries, site.backend = [], None
    by_site: dict[int, tuple] = {}
    site_index = {(s.component, s.layer): s for s in adapter.sites}
    for iv in interventions:
        for site, entry in entries_for(iv, adapter.description, site_index):
            site_entries = by_site.setdefault(id(site), (site, []))[1]
            check_conflicts(site, site_entries, entry)
            site_entries.append(entry)
    for site, entries in by_site.values():
        site.entries = entries
        site.backend = backend_for(site, entries, backend, adapter.description)
    return [site for site, _ in by_site.values()]


def entries_for(iv, description, site_index: dict) -> list[tuple]:
    """``(site, PlanEntry)`` for each attention module ``iv`` targets; raises PlanError when none matches."""
    try:
        component = description.component(iv.component)
    except KeyError as err:
        raise PlanError(f"{iv.name}: {err.args[0]}") from None
    try:
        layer_heads = iv.target.resolve(component.num_layers, component.num_heads)
    except (TargetError, ValueError) as err:
        raise PlanError(f"{iv.name}: {err}") from None
    if not iv.capabilities():
        return []  # works only through install() (e.g. a KV-cache policy): nothing to plan in attention
    found = []
    for layer, heads in layer_heads.items():
        site = site_index.get((component.name, layer))
        if site is None or not iv.target.matches_module(site.qualname):
            continue
        if iv.target.heads is None or iv.target.heads == "all":
            heads = list(range(site.num_heads))  # every head of this site (diffusers layers differ: SDXL, motion)
        elif max(heads, default=-1) >= site.num_heads:
            raise PlanError(f"{iv.name}: head {max(heads)} does not exist in {site.qualname} ({site.num_heads} heads)")
        head_mask = torch.zeros(site.num_heads, dtype=torch.bool)  # [H]
        head_mask[heads] = True
        found.append((site, PlanEntry(iv, head_mask)))
    if not found:
        example = next(iter(site_index.values())).qualname
        raise PlanError(
            f"{iv.name}: target layers={iv.target.layers!r} modules={iv.target.modules!r} matched no attention "
            f"module (valid layers 0..{component.num_layers - 1}; module names look like {example!r})")
    return found


def backend_for(site, entries: list, requested: str, description):
    """The backend that runs every hook of ``entries`` on this site's device (see kernels.backends)."""
    needs: dict[str, list[str]] = defaultdict(list)
    for e in entries:
        for cap in e.intervention.capabilities():
            needs[cap].append(e.intervention.name)
    if getattr(getattr(site.module, "config", None), "attn_logit_softcapping", None) is not None:
        needs["softcap"].append(f"{description.model_type} (attention logit softcapping)")
    device = next(site.module.parameters(), torch.empty(0)).device
    try:
        return choose_backend(requested, dict(needs), device)
    except (ValueError, KeyError) as err:
        raise PlanError(f"layer {site.layer}: {err}") from None


def check_conflicts(site, existing: list, new) -> None:
    """Two group reweightings on the same heads of one layer cannot both be applied exactly: refuse."""
    if "group_factors" not in new.intervention.capabilities():
        return
    for e in existing:
        if "group_factors" in e.intervention.capabilities() and bool((e.head_mask & new.head_mask).any()):
            raise PlanError(
                f"{e.intervention.name} and {new.intervention.name} both reweight attention groups on layer "
                f"{site.layer} heads {torch.nonzero(e.head_mask & new.head_mask).flatten().tolist()}; they conflict. "
                "Target disjoint heads or layers.")
