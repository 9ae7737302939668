"""The conformance matrix: every registered intervention × every family it supports × every invariant.

A newly registered intervention is covered without new test code: it declares what it needs
(:attr:`attnkit.Intervention.requires`) and its ``conformance`` parameters (a ``neutral`` setting that must
reproduce the stock model, an ``active`` one that must change it, and any invariant that does not apply to it,
with the reason). ``make test`` prints the table of cells at the end (see conftest.py).
"""

import pytest

from attnkit.api import available_interventions, get_intervention
from families import FAMILIES, REAL, family
from invariants import CHECKS, INVARIANTS, Case, NotApplicable, applicable

METHODS = list(available_interventions())


def _marks(fam: str):
    return [pytest.mark.slow] if fam in REAL else []


@pytest.mark.parametrize("invariant", INVARIANTS)
@pytest.mark.parametrize("fam", [pytest.param(f, marks=_marks(f)) for f in FAMILIES])
@pytest.mark.parametrize("method", METHODS)
def test_cell(method, fam, invariant, record_property):
    record_property("cell", [method, fam, invariant])
    cls = get_intervention(method)
    case = Case(cls, family(fam))
    try:
        applicable(case, invariant)
        if family(fam).note:
            record_property("note", family(fam).note)
        CHECKS[invariant](case)
    except NotApplicable as reason:
        pytest.skip(f"n/a: {reason}")
