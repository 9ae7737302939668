"""Collect the conformance cells and print them as one table at the end of the run.

The hooks live here and are imported by ``tests/conftest.py``: under xdist only the controller sees every cell's
report, and it loads the top-level conftest only (not ``tests/conformance/conftest.py``).
"""

import os
import sys
from collections import Counter, defaultdict

_CELLS: dict = {}


def pytest_runtest_logreport(report):
    props = dict(report.user_properties)
    cell = props.get("cell")
    if cell is None or (report.when == "teardown" and report.passed):
        return
    key = tuple(cell)
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _CELLS[key] = ("n/a", reason.replace("Skipped: ", "").replace("n/a: ", ""))
    elif report.failed:
        _CELLS[key] = ("FAIL", report.when)
    elif report.when == "call" and key not in _CELLS:
        _CELLS[key] = ("pass", props.get("note", ""))


def pytest_terminal_summary(terminalreporter):
    if not _CELLS:
        return
    sys.path.insert(0, os.path.dirname(__file__))
    from invariants import INVARIANTS

    write = terminalreporter.write_line
    symbols = {"pass": "ok", "FAIL": "FAIL", "n/a": "-"}
    rows = defaultdict(dict)
    for (method, fam, inv), (status, _) in _CELLS.items():
        rows[(method, fam)][inv] = status
    counts = Counter(status for status, _ in _CELLS.values())
    terminalreporter.section("attnkit conformance matrix")
    write(f"{len(_CELLS)} cells: {counts['pass']} pass, {counts['FAIL']} fail, {counts['n/a']} not applicable")
    header = f"{'method':<18} {'family':<13} " + " ".join(f"{inv[:8]:>8}" for inv in INVARIANTS)
    write(header)
    skipped_rows = Counter()
    for (method, fam), cells in sorted(rows.items()):
        if all(s == "n/a" for s in cells.values()):
            reasons = {_CELLS[(method, fam, inv)][1] for inv in cells}
            skipped_rows[(method, reasons.pop() if len(reasons) == 1 else "several reasons")] += 1
            continue
        write(f"{method:<18} {fam:<13} " + " ".join(f"{symbols.get(cells.get(inv), '?'):>8}" for inv in INVARIANTS))
    write("not applicable (whole rows):")
    for (method, reason), n in sorted(skipped_rows.items()):
        write(f"  {method:<18} {n:>2} families: {reason}")
    reasons = Counter(reason for status, reason in _CELLS.values() if status == "n/a")
    write("not applicable (cells), by reason:")
    for reason, n in reasons.most_common():
        write(f"  {n:>4}  {reason}")
    notes = {(fam, note) for (method, fam, inv), (status, note) in _CELLS.items() if status == "pass" and note}
    for fam, note in sorted(notes):
        write(f"note: {fam}: {note}")
