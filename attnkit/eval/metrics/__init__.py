"""Metric modules of the eval harness: pure functions first, then the ``Task`` classes that use them.

Each module is importable on its own and has no dependency on a model for its pure parts
(parsers, tokenizers, scoring rules), so they can be unit-tested on hand-computed cases.
"""
