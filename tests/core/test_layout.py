"""pytest imports test modules by basename (rootdir mode): two test files with one name break collection."""

from collections import Counter
from pathlib import Path


def test_test_module_basenames_are_unique():
    tests = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in tests.rglob("test_*.py"))
    assert [name for name, n in names.items() if n > 1] == []
