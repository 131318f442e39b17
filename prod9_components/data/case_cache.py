"""A per-case cache of encoder outputs (stage-2 tokens, MAISI latents): one ``.npz`` per case, encoded once.

Files live under ``<cache_dir>/<key>/<case>.npz``; ``key`` hashes the encoder file's bytes, the preprocessing
contract, the encoder settings and the cache format, so a new encoder (or other preprocessing) never reuses stale
arrays. Each file also stores the fingerprint of the case's input files (:func:`input_fingerprint`: path, size and
modification time of each - cheap, and any rewrite of a volume changes its mtime), so a corrected volume, or
another dataset with the same case names, is encoded again instead of silently reusing the old arrays. Files hold
plain arrays only and load with ``np.load(allow_pickle=False)``; each is written atomically (temp file + fsync +
rename), and a truncated one is encoded again. This module imports no network code: the caller passes
the function that encodes a case and the function that checks its arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prod9_components.atomic import atomic_path, write_json

logger = logging.getLogger("prod9")

CheckArrays = Callable[[Mapping[str, np.ndarray], str], dict[str, np.ndarray]]
FINGERPRINT = "input_fingerprint"  # the array of a cache file that holds its inputs' fingerprint
# Cache file -> (input fingerprint, case) this process cached there: two cases of one name refuse each other even
# when two calls cache them (the training and the validation split).
_claimed: dict[str, tuple[str, Mapping]] = {}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str, what: str = "file", actual: str | None = None,
                 recorded_by: str | os.PathLike | None = None) -> str:
    """Raise a one-line ValueError when ``path``'s sha256 is not ``expected`` (a stage link that changed).

    Args:
        path: the linked file (e.g. the stage-1 export named in a transformer checkpoint).
        expected: the sha256 the checkpoint recorded.
        what: what the file is, for the message.
        actual: the file's sha256 when the caller already has it from the read it loaded the file with
            (:func:`prod9_components.networks.export.read_record`); hashed here otherwise.
        recorded_by: the checkpoint that recorded ``expected``, named in the message.
    """
    actual = file_sha256(path) if actual is None else actual
    if actual != expected:
        by = f"{recorded_by} was" if recorded_by is not None else "the checkpoint was"
        raise ValueError(f"{path}: this {what} changed since {by} trained on it (sha256 {actual[:12]}…, "
                         f"expected {expected[:12]}…); pass the export it was trained on")
    return actual


def input_fingerprint(case: Mapping) -> str:
    """Hex SHA-256 over (key, absolute path, size, mtime_ns) of every input file of a case dict.

    Path, size and modification time rather than the bytes: stat is free where hashing every volume of a dataset on
    every run is not, and rewriting a volume (a correction, another dataset unpacked in its place) changes its mtime.
    Values of the case that are not existing files (its name, a split) do not count.
    """
    files = []
    for key in sorted(case, key=str):
        value = case[key]
        if isinstance(value, (str, os.PathLike)) and key != "case" and os.path.isfile(value):
            stat = os.stat(value)
            files.append([str(key), os.path.abspath(value), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def stored_fingerprint(path: str | os.PathLike) -> str | None:
    """The input fingerprint a cache file was encoded from; None for a file without one (made before fingerprints)."""
    with np.load(path, allow_pickle=False) as npz:
        return str(npz[FINGERPRINT]) if FINGERPRINT in npz.files else None


def cache_key(encoder_sha256: str, preprocessing: Mapping, extra: Mapping | None = None, version: int = 1) -> str:
    """First 16 hex digits of SHA-256 over the encoder file's hash, the preprocessing contract and the format.

    Args:
        encoder_sha256: hex SHA-256 of the stage-1 export the arrays come from - of the very bytes the encoder was
            loaded from (:func:`prod9_components.networks.export.read_record`), not of a second read of the file.
        preprocessing: the preprocessing contract (``record["preprocessing"]``), JSON-able.
        extra: anything else the arrays depend on, e.g. the sliding-window settings.
        version: the cache format version.
    """
    if not (isinstance(encoder_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", encoder_sha256)):
        raise ValueError(f"cache key: expected the hex sha256 of the encoder export, got {encoder_sha256!r}")
    contract = {"preprocessing": dict(preprocessing), "extra": dict(extra or {}), "version": version}
    text = encoder_sha256 + json.dumps(contract, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cast_arrays(arrays: Mapping[str, np.ndarray], schema: Mapping[str, tuple], source: str,
                what: str) -> dict[str, np.ndarray]:
    """The arrays of ``schema`` (name -> (dtype, number of dimensions)) as numpy arrays of those dtypes.

    Raises:
        ValueError: naming ``source`` when an array is missing or has another number of dimensions.
    """
    missing = [name for name in schema if name not in arrays]
    if missing:
        raise ValueError(f"{source}: {what} arrays lack {', '.join(missing)}")
    out = {}
    for name, (dtype, ndim) in schema.items():
        value = arrays[name]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if value.ndim != ndim:
            raise ValueError(f"{source}: '{name}' should have {ndim} dimensions, got shape {value.shape}")
        out[name] = value.astype(dtype, copy=False)
    return out


def load_case_file(path: str | os.PathLike, check: CheckArrays, what: str) -> dict[str, np.ndarray]:
    """Read one cache file (no pickle) and check its arrays.

    Raises:
        ValueError: ``"{path}: cannot read {what} cache file (...)"`` for a truncated or foreign file.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        return check(arrays, str(path))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{path}: cannot read {what} cache file ({reason}); delete it or rebuild the cache") from None


def _reuse_problem(path: Path, names: Sequence[str], fingerprint: str) -> str | None:
    """Why the cache file cannot be reused (None when it can): unreadable (its zip directory, written last, must list
    every array) or encoded from other input files. Cheap: reads the directory and the fingerprint only."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not set(names) <= set(npz.files):
                return "unreadable (truncated?)"
            stored = str(npz[FINGERPRINT]) if FINGERPRINT in npz.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # truncated (no zip directory), empty, not a zip
        return "unreadable (truncated?)"
    if stored != fingerprint:
        return "encoded from other input files (changed volumes, or another dataset with this case name)"
    return None


def _other_case_at(path: Path, fingerprint: str) -> Mapping | None:
    """The other, still unchanged, case this process cached at ``path`` (a duplicate name, not an edited volume)."""
    claimed = _claimed.get(str(path))
    if claimed is not None and claimed[0] != fingerprint and input_fingerprint(claimed[1]) == claimed[0]:
        return claimed[1]
    return None


def _folder_of(case: Mapping) -> str:
    """Where a case's input files are (the folder of its first one), to tell two cases of one name apart."""
    for key in sorted(case, key=str):
        value = case[key]
        if key != "case" and isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
            return os.path.dirname(os.path.abspath(value))
    return "no input files"


def build_case_cache(
    cases: Sequence[Mapping],
    cache_dir: str | os.PathLike,
    key: str,
    encode_case: Callable[[Mapping], Mapping[str, np.ndarray]],
    check: CheckArrays,
    names: Sequence[str],
    item_key: str,
    version: int,
    metadata: Mapping | None = None,
) -> list[dict]:
    """Encode every case not yet cached under ``<cache_dir>/<key>/`` and list the cache items.

    A case file ``<case>.npz`` that exists, lists every array and holds the case's current
    :func:`input_fingerprint` is reused; one that is missing, truncated, unreadable or made from other input files
    is (re-)encoded with a warning line, then written atomically with the fingerprint. Two cases of one name (in
    ``cases``, or cached into this folder earlier by this process with other input files) are refused: they would
    share one file. The first run also writes
    ``cache.json`` (key, format version, created time, ``metadata`` - by default ``encode_case.cache_metadata``).

    Args:
        cases: case dicts ``{"case": name, "t1": path, ...}`` (see ``data.brats``).
        cache_dir: root of all caches of this kind.
        key: from :func:`cache_key`.
        encode_case: ``case -> arrays``.
        check: ``(arrays, source) -> arrays to store``, raising a ValueError naming ``source``.
        names: the arrays every file holds.
        item_key: the key of the file's path in the returned items (``"tokens"``, ``"latent"``).
        version: the cache format version, stored in ``cache.json``.
        metadata: JSON-able description of what the arrays come from.

    Returns:
        ``[{"case": name, item_key: path_to_npz, **the case's other keys}]`` in the order of ``cases``.
    """
    folder = Path(cache_dir).expanduser() / str(key)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "cache.json").is_file():
        info = dict(metadata if metadata is not None else getattr(encode_case, "cache_metadata", {}) or {})
        write_json({"key": str(key), "version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info},
                   folder / "cache.json")

    items, todo, seen = [], [], {}
    for case in cases:
        name = str(case["case"])
        if not name or os.sep in name or name.startswith("."):
            raise ValueError(f"case name {name!r} cannot name a cache file")
        path = folder / f"{name}.npz"
        fingerprint = input_fingerprint(case)
        other = seen.get(name) or _other_case_at(path, fingerprint)
        if other is not None:
            raise ValueError(f"case name {name!r} is given to two cases (in {_folder_of(other)} and "
                             f"{_folder_of(case)}); both would be cached as {path} (case names must be unique)")
        seen[name] = case
        if not path.is_file():
            todo.append((case, path, fingerprint))
        elif problem := _reuse_problem(path, names, fingerprint):
            logger.warning("%s cache %s: %s, encoding it again", item_key, path, problem)
            todo.append((case, path, fingerprint))
        else:
            _claimed[str(path)] = (fingerprint, dict(case))
        items.append({"case": name, item_key: str(path), **{k: v for k, v in case.items() if k not in ("case", item_key)}})

    for case, path, fingerprint in tqdm(todo, desc=f"encoding {item_key}", unit="case", disable=not todo):
        arrays = check(encode_case(case), str(case["case"]))
        # A file object: given a name without ".npz", np.savez would append one.
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays, **{FINGERPRINT: np.array(fingerprint)})
        _claimed[str(path)] = (fingerprint, dict(case))
    logger.info("%s cache %s: %d reused, %d encoded", item_key, folder, len(items) - len(todo), len(todo))
    return items
