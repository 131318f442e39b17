"""Where per-case and per-sample outputs may go, checked before anything is written (DESIGN §10).

Two rules every writer of user-visible outputs (reconstructions, generated volumes, metrics) follows:

- :func:`output_path`: a file named after a case or sample stays inside the folder it is written to, whatever the
  name (a datalist may say ``"case": "../x"``);
- :func:`check_outputs`: before the first file is written, refuse outputs that collide with each other, that are
  one of the inputs (always), or that already exist (unless ``overwrite``), so a refused run has written nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def output_path(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, refused unless it resolves to a file directly inside ``folder``.

    Raises:
        ValueError: ``name`` is empty, absolute, holds a path separator or ``..``, or otherwise leaves ``folder``.
    """
    folder = Path(folder).expanduser()
    path = folder / str(name)
    # Resolve both (symlinks, "..") so a name cannot escape through either; the parent must be the folder itself.
    if not str(name) or Path(str(name)).is_absolute() or path.resolve().parent != folder.resolve():
        raise ValueError(f"output name {str(name)!r} would be written outside {folder}: a case or sample name must "
                         "be a plain file name (no path separator, no '..', not absolute)")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_outputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike] = (),
                  overwrite: bool = False) -> list[Path]:
    """Check the files a command is about to write; returns them as paths.

    Args:
        outputs: every file the command will write.
        inputs: every file it reads (volumes, masks): an output may never replace one, even with ``overwrite``.
        overwrite: allow replacing outputs that already exist (``--overwrite``).

    Raises:
        ValueError: two outputs share a name, or an output is an input.
        FileExistsError: an output exists and ``overwrite`` is false (naming the file and ``--overwrite``).
    """
    outputs = [Path(p).expanduser() for p in outputs]
    inputs = [Path(p).expanduser() for p in inputs]
    seen: dict[Path, Path] = {}
    for path in outputs:
        key = path.resolve()
        if key in seen:
            raise ValueError(f"two outputs would both be written to {path}: give the inputs distinct names")
        seen[key] = path
        clash = next((i for i in inputs if _same_file(path, i)), None)
        if clash is not None:
            raise ValueError(f"output {path} is the input {clash}: choose another output (never overwritten)")
    existing = next((p for p in outputs if p.exists()), None)
    if existing is not None and not overwrite:
        raise FileExistsError(f"{existing} already exists: pass --overwrite to replace it, or choose another output")
    return outputs
