"""The closing line of a verb that writes volumes: which files it wrote, found on disk after the run.

A verb's writers run inside the bundle workflow, so the command reads what they wrote from the folder itself: the
files modified since the verb started (a refused run wrote nothing: outputs are checked before the first write).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# File times come from a coarse kernel clock that may trail time.time_ns() by a tick: allow for it.
CLOCK_SLACK_NS = 50_000_000


def start_clock() -> int:
    """The time a verb starts, to pass to :func:`written_since`."""
    return time.time_ns() - CLOCK_SLACK_NS


def written_since(folder: str | os.PathLike, start_ns: int) -> list[Path]:
    """Files directly in ``folder`` modified at or after ``start_ns`` (hidden temp files excluded), sorted."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.stat().st_mtime_ns >= start_ns)


def summary(what: str, folder: str | os.PathLike, start_ns: int) -> str:
    """``"<what>: 4 file(s) written to <folder> (sample_0001_T1.nii.gz ... sample_0004_T1.nii.gz)"``."""
    files = written_since(folder, start_ns)
    names = files[0].name if len(files) == 1 else f"{files[0].name} ... {files[-1].name}" if files else "none"
    return f"{what}: {len(files)} file(s) written to {folder} ({names})"
