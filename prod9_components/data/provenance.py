"""What a training run was made from, so that resuming it cannot silently continue on other data.

A resumed run keeps the ``datalist.json`` its first run wrote (:func:`check_resumed_splits`) instead of rewriting it,
and ``last.ckpt`` carries a fingerprint of the split (:func:`splits_fingerprint`): an output folder then always
describes the data its checkpoints saw. Every refusal is one line naming ``last.ckpt`` and the way out.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prod9_components.data.settings import bool_setting

__all__ = ["RESUME_WAY_OUT", "check_resumed_splits", "resume_flag", "resume_refusal", "splits_fingerprint"]

RESUME_WAY_OUT = "pass --resume false to start a new run there, or choose a new --output-dir"


def resume_flag(value: Any) -> bool:
    """The ``resume`` setting as a bool (:func:`~prod9_components.data.settings.bool_setting`: ``"false"`` is
    false, a word that is neither is refused)."""
    return bool_setting("resume", value)


def resume_refusal(last_ckpt: str | os.PathLike, what: str) -> ValueError:
    """The one-line error of a resume that would continue another run: ``<last.ckpt>: <what>; <way out>``."""
    return ValueError(f"{last_ckpt}: {what}; {RESUME_WAY_OUT}")


def _plain_splits(splits: Mapping[str, Sequence[Mapping]]) -> dict[str, list[dict]]:
    """``splits`` as ``datalist.json`` holds them (JSON types), so a saved file and a new split compare equal."""
    return json.loads(json.dumps({split: list(items) for split, items in splits.items()}))


def splits_fingerprint(splits: Mapping[str, Sequence[Mapping]]) -> str:
    """Hex SHA-256 of every split's case names, file paths and file sizes.

    Sizes (not modification times, which a plain copy of a dataset changes) catch a file replaced at the same path.
    """
    described = {
        split: [{key: [value, os.path.getsize(value) if os.path.isfile(value) else None]
                 if isinstance(value, str) and key != "case" else value
                 for key, value in sorted(item.items())} for item in items]
        for split, items in sorted(_plain_splits(splits).items())
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _first_difference(saved: Mapping[str, list], current: Mapping[str, list]) -> str:
    """A few words on where two splits differ (the first split that does)."""
    for split in sorted(set(saved) | set(current)):
        before = {str(item.get("case")): item for item in saved.get(split) or []}
        now = {str(item.get("case")): item for item in current.get(split) or []}
        if before == now:
            continue
        gone, new = sorted(before.keys() - now.keys()), sorted(now.keys() - before.keys())
        if gone or new:
            return f"its {split} split holds {gone[:3]} where this run's holds {new[:3]}"
        case = next(name for name in before if before[name] != now[name])
        return f"case {case!r} of its {split} split names other files"
    return "the splits differ"


def check_resumed_splits(output_dir: str | os.PathLike, splits: Mapping[str, Sequence[Mapping]],
                         resume: Any = True) -> bool:
    """Whether ``<output_dir>/datalist.json`` is to be kept as it is: True when the run there is resumed (resume on,
    ``last.ckpt`` and ``datalist.json`` present) and the saved split equals ``splits``; False when there is no run
    to resume (the caller writes the file).

    Raises:
        ValueError: one line naming ``last.ckpt``, the saved datalist and the first difference, when a resumed run
            would continue on other data (or the saved datalist cannot be read).
    """
    folder = Path(output_dir).expanduser()
    last, saved = folder / "last.ckpt", folder / "datalist.json"
    if not (resume_flag(resume) and last.is_file() and saved.is_file()):
        return False
    try:
        previous = json.loads(saved.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise resume_refusal(last, f"cannot read the data split it was trained on, {saved} ({error})") from None
    current = _plain_splits(splits)
    if not isinstance(previous, dict):
        raise resume_refusal(last, f"{saved} is not a datalist (expected a JSON object of splits)")
    if previous != current:
        raise resume_refusal(last, f"it was trained on the data split in {saved}, and this run's differs "
                                   f"({_first_difference(previous, current)})")
    return True
