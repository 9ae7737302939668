"""The invariants every registered intervention must keep on every family it supports.

Each ``check_<invariant>(case)`` raises ``AssertionError`` on a violation, or :class:`NotApplicable` with the reason
when the invariant does not apply to this method on this family. A :class:`Case` is one method on one family: the
intervention class, its declared ``conformance`` parameters and the :class:`~families.Family`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import attnkit
from attnkit.interventions.noop import Noop
from attnkit.testing import sample_inputs

INVARIANTS = ("neutral", "remove", "disabled", "batched", "fused", "generate", "half", "two_models",
              "failed_forward", "copies", "overlap")
TITLES = {
    "neutral": "neutral parameters equal the stock model",
    "remove": "attach then remove is bitwise the stock model",
    "disabled": "disabled() equals the stock model",
    "batched": "batched (different left padding, a fully padded row) equals per-sample",
    "fused": "the fused backend equals the eager reference",
    "generate": "KV-cache generate equals step-by-step recomputation",
    "half": "float16 / bfloat16 with a padded row give no NaN",
    "two_models": "one instance on two models: refused clearly, a second instance works",
    "failed_forward": "a failed forward leaves the handle usable",
    "copies": "deep copies and models sharing a config stay correct",
    "overlap": "nested or overlapping attachment is refused",
}
NEW_TOKENS = 3


class NotApplicable(Exception):
    """The invariant does not apply to this cell; the message says why."""


@dataclass
class Case:
    cls: type
    family: object

    @property
    def conformance(self) -> dict:
        return self.cls.conformance

    def params(self, which: str = "active") -> dict:
        params = self.conformance.get(which)
        if params is None:
            raise NotApplicable(f"{self.cls.name} declares no {which} setting")
        return dict(params)

    def build(self, which: str = "active"):
        return self.cls(**self.params(which))

    def spans(self) -> list[str]:
        return sorted(r[len("span:"):] for r in self.cls.requires if r.startswith("span:"))

    def attach(self, model, which: str = "active", backend: str = "auto", intervention=None, padded: bool = True):
        handle = attnkit.attach(model, [intervention or self.build(which)], backend=backend)
        self.set_spans(handle, padded)
        return handle

    def set_spans(self, handle, padded: bool = True, sample: int | None = None, batch: dict | None = None) -> None:
        """Give every user span the method reads: the middle third of each sample's real tokens."""
        if not self.spans():
            return
        fam = self.family
        if sample is not None:
            masks = [fam.samples[sample]["attention_mask"]]
        else:
            masks = list((batch or fam.batch)["attention_mask"])
        ranges = []
        for mask in masks:
            mask = mask.reshape(-1)
            real = int(mask.sum())
            start = int(mask.numel() - real)
            ranges.append([(start + real // 3, start + max(2 * real // 3, real // 3 + 1))] if real >= 2 else [])
        for name in self.spans():
            handle.set_span(name, ranges)


def applicable(case: Case, invariant: str) -> None:
    """Raise NotApplicable when ``invariant`` does not apply to ``case`` (declared or structural reasons)."""
    fam, conf = case.family, case.conformance
    missing = fam.description.missing(case.cls.requires)
    if missing:
        raise NotApplicable(f"needs {', '.join(missing)}")
    if conf.get("families") is not None and fam.name not in conf["families"]:
        raise NotApplicable(conf.get("families_reason") or f"runs on {', '.join(conf['families'])} only")
    declared = conf.get("not_applicable", {})
    if invariant in declared:
        raise NotApplicable(declared[invariant])
    if invariant == "generate" and not fam.tokens:
        raise NotApplicable("a denoiser has no token sequence or KV cache")
    if invariant in ("batched", "fused", "generate", "half", "copies", "two_models") and conf.get("active") is None:
        raise NotApplicable(f"{case.cls.name} declares no active setting")
    try:  # a method may refuse a family at attach, with one sentence: that is a clear "not supported"
        attnkit.attach(fam.model, [case.build("active" if conf.get("active") is not None else "neutral")]).remove()
    except attnkit.AttachError as err:
        raise NotApplicable(f"refused at attach: {err}") from None


# ---- comparisons ----------------------------------------------------------------------------------------------------
def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    """``max |got - want| <= rtol * max(1, max |want|)`` (logit scales differ between tiny and real models)."""
    got, want = got.float(), want.float()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3g} > {rtol:g} x {scale:.3g}"


def real_positions(case: Case, out: torch.Tensor) -> torch.Tensor:
    """The outputs of the real tokens of every real sample, flattened: ``[n_real_tokens, V]``; the last position of
    each real sample when the model returns fewer positions than it was given (token pruning)."""
    fam = case.family
    rows = fam.real_rows()
    mask = fam.batch["attention_mask"][rows].bool()  # [B, N]
    if out.shape[1] != mask.shape[1]:
        return out[rows, -1]
    return out[rows][mask]


def stock_comparison(case: Case, out: torch.Tensor, rtol: float, what: str) -> None:
    fam = case.family
    if fam.tokens:
        assert_close(real_positions(case, out), real_positions(case, fam.stock), rtol, what)
    else:
        assert_close(out, fam.stock, rtol, what)


def state_of(model) -> dict:
    """What attaching may change on a model and removing must restore: configs, processors, hook counts."""
    state = {}
    for name, module in model.named_modules() if hasattr(model, "named_modules") else _pipeline_modules(model):
        state[name] = (id(getattr(module, "config", None)), type(getattr(module, "processor", None)).__name__,
                       len(module._forward_hooks), len(module._forward_pre_hooks))
    return state


def _pipeline_modules(pipe):
    for component, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for name, sub in module.named_modules():
                yield f"{component}.{name}", sub


# ---- the invariants -------------------------------------------------------------------------------------------------
def check_neutral(case: Case) -> None:
    fam = case.family
    with case.attach(fam.model, "neutral"):
        out = fam.run(fam.model)
    stock_comparison(case, out, 1e-5, "neutral parameters vs stock")


def check_remove(case: Case) -> None:
    fam = case.family
    before = state_of(fam.model)
    handle = case.attach(fam.model)
    fam.run(fam.model)
    handle.remove()
    assert state_of(fam.model) == before, "remove() left configs, processors or hooks changed"
    out = fam.run(fam.model)
    assert torch.equal(out, fam.stock), "outputs after remove() differ from the stock model"


def check_disabled(case: Case) -> None:
    fam = case.family
    with case.attach(fam.model) as handle:
        fam.run(fam.model)
        with handle.disabled():
            inside = fam.run(fam.model)
        fam.run(fam.model)
    assert torch.equal(inside, fam.stock), f"disabled() differs from stock by {(inside - fam.stock).abs().max():.3g}"


def check_batched(case: Case) -> None:
    fam = case.family
    if not fam.tokens:
        _check_batched_diffusion(case)
        return
    with case.attach(fam.model) as handle:
        batched = fam.run(fam.model)
        alone = []
        for b, sample in enumerate(fam.samples):
            handle.clear_spans()
            case.set_spans(handle, sample=b)
            alone.append(fam.run(fam.model, sample))
    # never stricter than the stock model's own batching noise; a method may declare (with the reason in its
    # conformance dict) how much an ill-conditioned rule amplifies that noise
    rtol = max(case.conformance.get("tolerance", {}).get("batched", 1e-4), 2 * fam.stock_batching_gap)
    for b, out in enumerate(alone):
        n = out.shape[1]
        what = f"sample {b} in the batch vs alone"
        if batched.shape[1] >= n and out.shape[1] == fam.samples[b]["input_ids"].shape[1]:
            assert_close(batched[b, -n:], out[0], rtol, what)
        else:
            assert_close(batched[b, -1], out[0, -1], rtol, what + " (last position)")
    if fam.has_padded_row:
        assert not torch.isnan(batched[fam.real_rows()]).any()


def _check_batched_diffusion(case: Case) -> None:
    fam = case.family
    if fam.kind == "pipeline":
        raise NotApplicable("a pipeline call is one batch (prompts share the classifier-free guidance pass)")
    with case.attach(fam.model):
        batched = fam.run(fam.model)
        for b in range(batched.shape[0]):
            one = sample_inputs(fam.name, fam.inputs, b, batched.shape[0])  # video: that sample's per-frame text
            assert_close(fam.run(fam.model, one)[0], batched[b], 1e-4, f"sample {b} in the batch vs alone")


def check_fused(case: Case) -> None:
    fam = case.family
    with case.attach(fam.model, backend="auto") as handle:
        backends = {m["backend"] for m in handle.report()["modules"]}
        fused = fam.run(fam.model)
    if not backends:
        raise NotApplicable(f"{case.cls.name} has no attention hooks: nothing runs on a backend")
    if backends == {"eager"}:
        raise NotApplicable(f"{case.cls.name} runs on the eager reference only (its hooks need the full map)")
    with case.attach(fam.model, backend="eager"):
        eager = fam.run(fam.model)
    if fam.tokens:
        assert_close(real_positions(case, fused), real_positions(case, eager), 1e-4, "fused vs eager")
    else:
        assert_close(fused, eager, 1e-4, "fused vs eager")


def check_generate(case: Case) -> None:
    fam = case.family
    batch = {k: v for k, v in fam.real_batch.items() if k != "position_ids"}  # generate derives positions itself
    pad = getattr(fam.model.generation_config, "pad_token_id", None) or 0
    with case.attach(fam.model) as handle, torch.no_grad():
        case.set_spans(handle, batch=batch)
        gen = fam.model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=pad, eos_token_id=None)
        width = batch["input_ids"].shape[1]
        for t, step_logits in enumerate(gen.logits):
            ids = gen.sequences[:, : width + t]
            grown = {"input_ids": ids}
            for key in ("attention_mask", "mm_token_type_ids"):
                if key in batch:
                    fill = torch.ones if key == "attention_mask" else torch.zeros
                    grown[key] = torch.cat([batch[key], fill(ids.shape[0], t, dtype=torch.long)], 1)
            if fam.kind in ("text", "real"):
                grown["position_ids"] = (grown["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            extra = {k: v for k, v in batch.items() if k not in grown}
            handle.clear_spans()
            case.set_spans(handle, batch=batch)
            full = fam.model(**grown, use_cache=False, **extra).logits[:, -1]
            assert_close(step_logits, full, 1e-4, f"decode step {t} vs recomputation")


def check_half(case: Case) -> None:
    fam = case.family
    for dtype in (torch.float16, torch.bfloat16):
        model = fam.half_model(dtype)
        try:
            stock = fam.run(model)
        except Exception as err:  # noqa: BLE001
            raise NotApplicable(f"the stock model cannot run in {dtype} on this device ({type(err).__name__})")
        if fam.tokens and not torch.isfinite(real_positions(case, stock)).all():
            if dtype == torch.float16:
                continue  # e.g. Gemma overflows in float16 even without attnkit: bfloat16 is still checked
            raise NotApplicable(f"the stock model gives non-finite outputs in {dtype}")
        with case.attach(model):
            out = fam.run(model)
        if fam.tokens:
            real = real_positions(case, out)
            assert not torch.isnan(real).any(), f"{dtype}: NaN in the outputs of real tokens"
            if out.shape != stock.shape:  # pruning returns fewer positions: compare each row's last one
                out, stock = out[:, -1], stock[:, -1]
        assert not (torch.isnan(out) & ~torch.isnan(stock)).any(), f"{dtype}: NaN where the stock model has none"


def check_two_models(case: Case) -> None:
    fam = case.family
    other = fam.second_model()
    stock_other = fam.run(other)
    iv = case.build()
    with case.attach(fam.model, intervention=iv):
        with pytest.raises(attnkit.AttachError, match="already attached"):
            attnkit.attach(other, [iv])
        assert torch.equal(fam.run(other), stock_other), "a refused attach changed the second model"
        with case.attach(other, intervention=copy.deepcopy(iv)):
            second = fam.run(other)
    with case.attach(other):
        alone = fam.run(other)
    assert torch.equal(second, alone), "a second instance on the second model differs from running it alone"


def check_failed_forward(case: Case) -> None:
    fam = case.family
    with case.attach(fam.model):
        first = fam.run(fam.model)
        with pytest.raises(Exception):  # noqa: B017 - whatever the model raises for a bad input
            fam.run(fam.model, fam.bad_input())
        again = fam.run(fam.model)
    assert torch.equal(first, again), "outputs after a failed forward differ from before it"


def check_copies(case: Case) -> None:
    fam = case.family
    with case.attach(fam.model):
        copied = copy.deepcopy(fam.model)
    # the copy was made while attached; the handle is gone now and the copy must be a stock model
    stock_comparison(case, fam.run(copied), 1e-6, "a deep copy made while attached vs stock")
    if fam.tokens:
        twin = fam.second_model()
        _share_config(twin, fam.model)
        stock_twin = fam.run(twin)
        with case.attach(fam.model):
            assert torch.equal(fam.run(twin), stock_twin), "a model sharing the config changed"
            with case.attach(twin, intervention=case.build()):
                pass
        assert torch.equal(fam.run(twin), stock_twin), "a model sharing the config is not stock after removal"
        assert torch.equal(fam.run(fam.model), fam.stock), "the model is not stock after both removals"


def _share_config(twin, model) -> None:
    """Make ``twin`` use ``model``'s config objects (as two models loaded from one config would)."""
    configs = {}
    for (_, a), (_, b) in zip(model.named_modules(), twin.named_modules()):
        if hasattr(a, "config") and hasattr(b, "config"):
            configs.setdefault(id(b.config), a.config)
            b.config = configs[id(b.config)]


def check_overlap(case: Case) -> None:
    fam = case.family
    with case.attach(fam.model):
        with pytest.raises(attnkit.AttachError, match="already attached"):
            attnkit.attach(fam.model, [Noop()])
        inner = fam.inner()
        if inner is not None:
            with pytest.raises(attnkit.AttachError, match="already attached"):
                attnkit.attach(inner, [Noop()])
        out = fam.run(fam.model)
    with case.attach(fam.model):
        assert torch.equal(fam.run(fam.model), out), "a refused attach changed the running attachment"


CHECKS = {name: globals()[f"check_{name}"] for name in INVARIANTS}
