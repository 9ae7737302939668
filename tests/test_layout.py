"""The tests folder mirrors the package, and pytest can import every test module."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "attnkit"
#: test folders that are not a package folder: the cross-cutting conformance matrix, the notebooks, the benchmarks
NOT_PACKAGE = {"conformance", "notebooks", "benchmarks"}


def test_test_module_basenames_are_unique():
    """pytest imports test modules by basename (rootdir mode): two test files with one name break collection."""
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [name for name, n in names.items() if n > 1] == []


def test_test_folders_mirror_the_package():
    folders = {p.relative_to(TESTS) for p in TESTS.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    stray = [str(f) for f in folders if f.parts[0] not in NOT_PACKAGE and not (PACKAGE / f).is_dir()]
    assert stray == [], f"test folders with no package folder of the same path: {stray}"
