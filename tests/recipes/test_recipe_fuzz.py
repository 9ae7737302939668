"""Property-based fuzzing of the recipe loader and of attach.

Whatever the YAML (broken syntax, wrong types, non-finite numbers, huge ranges, odd unicode, deep nesting), reading
it ends in a Recipe or a RecipeError naming the file and line; attaching what was read ends in a handle or in an
AttachError/RecipeError naming file and line — never another exception — and the model's outputs equal the stock
outputs afterwards (nothing half-applied).
"""

import inspect
import math
import re
from functools import lru_cache

import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import attnkit  # noqa: E402
from attnkit.interventions import INTERVENTIONS, load_builtin  # noqa: E402
from attnkit.recipes import RecipeError, loads_recipe  # noqa: E402
from attnkit.recipes.schema import ENTRY_KEYS, TOP_KEYS, constructor_params  # noqa: E402
from attnkit.testing import tiny_causal_lm  # noqa: E402

SOURCE = "fuzz.yaml"
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.filter_too_much])
load_builtin()
METHODS = INTERVENTIONS.names()

# ---- values: wrong types, non-finite and huge numbers, odd unicode, nesting -----------------------------------------
odd_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["", "all", "2-5", "0:-1", "-1", "9999999999-1", "ünïcødé", "\u202e\u0000", "🙂", "null", "~", "4e-1", ".inf",
     "self_attn[(", "(?P<", "*", "a" * 200])
numbers = (st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from([0, 1, 2, -1, 2**63, -(2**63)])
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.4, -0.5, 1e308, 1e-320]))
scalars = st.none() | st.booleans() | numbers | odd_text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.one_of(odd_text, st.integers(-3, 40)), inner, max_size=4), max_leaves=12)


def deep(depth: int):
    """A list nested ``depth`` levels deep."""
    out = 0
    for _ in range(depth):
        out = [out]
    return out


def _defaults(cls) -> dict:
    return {k: d for k, (_, d) in constructor_params(cls).items() if d is not inspect.Parameter.empty}


@st.composite
def params_for(draw, method, sane: bool):
    """The method's own parameters at their defaults, some replaced by random values (always, unless ``sane``:
    then one at most) and, unless ``sane``, unknown keys."""
    cls = INTERVENTIONS.get(method) if method in INTERVENTIONS else None
    params = _defaults(cls) if cls is not None and draw(st.booleans()) else {}
    known = list(constructor_params(cls)) if cls is not None else []
    for _ in range(draw(st.integers(0, 1 if sane else 3))):
        key = draw(st.sampled_from(known)) if known and (sane or draw(st.booleans())) else draw(odd_text)
        params[key] = draw(values)
    return params


LAYERS = st.sampled_from(["all", 0, 1, -1, "0-1", "1:2", "0:-1", [0, "1-1"], 2**64, "9-999999", "2:30", 7, [], None])
HEADS = st.sampled_from(["all", 0, [0, 1], {0: [1]}, {0: {1: 2}}, {"scores": "x", "top_k": 2}, [99], -1, {5: [0]}])
MODULES = st.sampled_from(["self_attn", "layers\\.0\\.", "[", "(?", "nothing-matches", ".*"])


@st.composite
def entries(draw, sane: bool):
    if sane or draw(st.integers(0, 9)):
        method = draw(st.sampled_from(METHODS) if sane else st.sampled_from(METHODS) | odd_text)
    else:
        method = draw(values)
    entry = {"method": method}
    keys = ("layers", "heads", "modules", "params") if sane else ENTRY_KEYS[1:] + ("bogus",)
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        if key == "layers":
            entry[key] = draw(LAYERS if sane else LAYERS | values)
        elif key == "heads":
            entry[key] = draw(HEADS if sane else HEADS | values)
        elif key == "modules":
            entry[key] = draw(MODULES if sane else MODULES | odd_text)
        elif key == "params":
            entry[key] = draw(params_for(method, sane) if isinstance(method, str) else values)
        else:
            entry[key] = draw(values)
    return entry


@st.composite
def recipe_docs(draw):
    """A recipe-shaped mapping: half of them sane (known methods, one damaged value at most), half damaged
    anywhere."""
    sane = draw(st.booleans())
    doc = {"name": "fuzz", "version": 1}
    if not sane:
        doc = {"name": draw(st.sampled_from(["fuzz"]) | odd_text | values),
               "version": draw(st.sampled_from([1, "1"]) | values)}
    if draw(st.booleans()):
        doc["backend"] = draw(st.sampled_from(["auto", "eager", "torch"] if sane else
                                              ["auto", "eager", "torch", "triton", "egaer"]) | (st.nothing() if sane
                                                                                               else values))
    if not sane and draw(st.integers(0, 4)) == 0:
        doc["targets"] = draw(st.dictionaries(odd_text, st.fixed_dictionaries({}, optional={
            "layers": st.sampled_from([0, "0-1", 99]), "heads": st.sampled_from([0, [1], 99])}), max_size=2) | values)
    if sane or draw(st.integers(0, 9)):
        doc["interventions"] = draw(st.lists(entries(sane), min_size=1 if sane else 0, max_size=3))
    else:
        doc["interventions"] = draw(values)
    if not sane:
        for key in draw(st.lists(st.sampled_from(TOP_KEYS + ("extra", "descripton")), max_size=2)):
            doc.pop(key, None) if draw(st.booleans()) else doc.setdefault(key, draw(values))
        if draw(st.integers(0, 9)) == 0:
            doc["interventions"] = deep(draw(st.integers(20, 400)))
    return doc


def dump(doc, allow_unicode: bool = True) -> str:
    return yaml.safe_dump(doc, allow_unicode=allow_unicode, sort_keys=False)


@st.composite
def yaml_texts(draw):
    """Well-formed dumps of recipe-shaped documents, hand-written YAML quirks, or damaged text."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.text(max_size=200))
    text = dump(draw(recipe_docs()), allow_unicode=draw(st.booleans()))
    if kind == 1:  # damage: cut, duplicate a line, insert odd characters
        lines = text.splitlines(True)
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        op = draw(st.integers(0, 2))
        if op == 0:
            lines = lines[:i]
        elif op == 1 and lines:
            lines.insert(i, lines[i])
        else:
            lines.insert(i, draw(st.sampled_from(["  - [\n", "key: : :\n", "\t\n", "a: &x 1\nb: *y\n", "? [1]\n",
                                                  "!!python/object:os.system x\n", "\x00\n", "%YAML 1.1\n---\n"])))
        text = "".join(lines)
    if kind == 2:
        text += draw(st.sampled_from(["name: again\n", "alpha: .inf\n", "version: 4e-1\n", "backend: .nan\n"]))
    return text


# ---- checks -----------------------------------------------------------------------------------------------------
LOCATED = re.compile(rf"^{re.escape(SOURCE)}:(\d+): \S")


def check_located(err: Exception, text: str) -> None:
    """The message starts with ``file:line:`` and the line lies inside the document."""
    msg = str(err)
    match = LOCATED.match(msg)
    assert match, f"not located: {msg!r}"
    assert 1 <= int(match.group(1)) <= max(text.count("\n"), 0) + 2, msg


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@lru_cache(maxsize=1)
def stock():
    """The tiny model, its probe input and its stock logits (built once)."""
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        return model, ids, model(ids).logits.clone()


STOCK_HOOKS = hook_count(stock()[0])


def assert_stock(model, ids, ref) -> None:
    """No live handle left on the model (a new one attaches), the stock attention implementation, no extra hooks,
    bitwise-stock outputs."""
    attnkit.attach(model, []).remove()
    assert model.config._attn_implementation == "sdpa"
    assert hook_count(model) == STOCK_HOOKS
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@FUZZ
@given(text=yaml_texts())
def test_loader_gives_a_recipe_or_a_located_error(text):
    try:
        recipe = loads_recipe(text, source=SOURCE)
    except RecipeError as err:
        check_located(err, text)
        return
    assert recipe.interventions is not None
    assert all(isinstance(e, dict) and e["method"] in INTERVENTIONS for e in recipe.interventions)
    for entry in recipe.interventions:  # nothing non-finite or beyond 64 bits reached a constructor
        for value in (entry.get("params") or {}).values():
            assert not (isinstance(value, float) and not math.isfinite(value))


@FUZZ
@given(doc=recipe_docs())
def test_attach_gives_a_handle_or_a_located_error_and_never_half_applies(doc):
    model, ids, ref = stock()
    text = dump(doc)
    try:
        recipe = loads_recipe(text, source=SOURCE)
    except RecipeError as err:
        check_located(err, text)
        return
    try:
        handle = attnkit.attach(model, recipe)
    except (attnkit.AttachError, RecipeError) as err:
        check_located(err, text)
    else:
        handle.remove()
    assert_stock(model, ids, ref)


def attach_outcome(model, doc) -> str:
    """What reading and attaching ``doc`` ends in: "recipe error", "attached" or "attach error"."""
    try:
        recipe = loads_recipe(dump(doc), source=SOURCE)
    except RecipeError:
        return "recipe error"
    try:
        attnkit.attach(model, recipe).remove()
    except attnkit.AttachError:
        return "attach error"
    return "attached"


@pytest.mark.parametrize("outcome", ["recipe error", "attached", "attach error"])
def test_fuzz_strategies_reach_attach(outcome):
    """The attach fuzz is not vacuous: its documents fail to load, attach, and fail to attach. ``find`` searches
    the strategy until a document ends in ``outcome`` (raising NoSuchExample when none does), so the check does not
    depend on which examples one hypothesis release happens to draw first."""
    model, ids, ref = stock()
    found = hypothesis.find(recipe_docs(), lambda doc: attach_outcome(model, doc) == outcome,
                            settings=settings(max_examples=2000, deadline=None, database=None,
                                              suppress_health_check=list(HealthCheck)))
    assert attach_outcome(model, found) == outcome
    assert_stock(model, ids, ref)
