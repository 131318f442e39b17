"""One-line errors under ``python -m monai.bundle run``, as the ``prod9-train-*`` commands print them.

MONAI wraps an error raised inside a config expression in ``RuntimeError: Failed to evaluate ConfigExpression(...)``
and prints the whole chain, so a bad input (``token grid (37, 52, 39) exceeds the transformer's max_grid_size``)
ends a page of traceback. Every bundle imports this module (its ``imports``), which installs a ``sys.excepthook``
that prints the innermost error in one line, ``error: <message>``, when it is a ``ValueError`` or ``OSError`` (what
prod9 raises for bad data, paths and settings, always naming the value). Any other error keeps its traceback, and
``PROD9_TRACEBACK=1`` keeps it for every error. The hook only sees errors nothing else caught: the CLI, pytest and
notebooks are unaffected.
"""

from __future__ import annotations

import os
import sys

from prod9_components.cli.bundle_runner import one_line, root_cause

_previous = sys.excepthook


def one_line_excepthook(kind, error, traceback) -> None:
    cause = root_cause(error)
    if isinstance(cause, (ValueError, OSError)) and not os.environ.get("PROD9_TRACEBACK"):
        print(f"error: {one_line(cause)} (PROD9_TRACEBACK=1 shows the traceback)", file=sys.stderr)
    else:
        _previous(kind, error, traceback)


sys.excepthook = one_line_excepthook
