"""The eval harness's user errors: one sentence that names the file, field or value and says how to fix it.

The command line prints such an error as one line and exits with status 2 (never a traceback); library callers get
an ``EvalError`` (a ``ValueError``). ``UnknownTaskError`` is also a ``KeyError`` for code that looks names up.

Example:
    >>> str(EvalError("--limit must be a positive integer, got 0."))
    '--limit must be a positive integer, got 0.'
    >>> str(UnknownTaskError("unknown eval task 'pope'; did you mean 'pope_random'?"))
    "unknown eval task 'pope'; did you mean 'pope_random'?"
"""

from __future__ import annotations


class EvalError(ValueError):
    """A mistake in what the user asked for (task, parameters, data, arms, output folder)."""


class UnknownTaskError(EvalError, KeyError):
    """A task name that is not registered (the message suggests close names)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
