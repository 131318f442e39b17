"""A per-case cache of encoder outputs (stage-2 tokens, MAISI latents): one ``.npz`` per case, encoded once.

Files live under ``<cache_dir>/<key>/<case>.npz``; ``key`` hashes the encoder file's bytes, the preprocessing
contract, the encoder settings and the cache format, so a new encoder (or other preprocessing) never reuses stale
arrays. Files hold plain arrays only and load with ``np.load(allow_pickle=False)``; each is written atomically
(temp file + rename), and a truncated one is encoded again. This module imports no network code: the caller passes
the function that encodes a case and the function that checks its arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prod9_components.atomic import atomic_path, write_json

logger = logging.getLogger("prod9")

CheckArrays = Callable[[Mapping[str, np.ndarray], str], dict[str, np.ndarray]]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str, what: str = "file") -> str:
    """Raise a one-line ValueError when ``path``'s sha256 is not ``expected`` (a stage link that changed)."""
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(f"{path}: this {what} changed since the checkpoint was trained (sha256 {actual[:12]}…, "
                         f"expected {expected[:12]}…); pass the export it was trained on")
    return actual


def cache_key(encoder_path: str | os.PathLike, preprocessing: Mapping, extra: Mapping | None = None,
              version: int = 1) -> str:
    """First 16 hex digits of SHA-256 over the encoder file's hash, the preprocessing contract and the format.

    Args:
        encoder_path: the stage-1 export the arrays come from (its bytes are hashed, not its name).
        preprocessing: the preprocessing contract (``record["preprocessing"]``), JSON-able.
        extra: anything else the arrays depend on, e.g. the sliding-window settings.
        version: the cache format version.
    """
    contract = {"preprocessing": dict(preprocessing), "extra": dict(extra or {}), "version": version}
    text = file_sha256(encoder_path) + json.dumps(contract, sort_keys=True, default=str)
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


def _is_readable(path: Path, names: Sequence[str]) -> bool:
    """Cheap check that a cache file is complete: its zip directory (written last) lists every array."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return set(names) <= set(npz.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # truncated (no zip directory), empty, not a zip
        return False


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

    A case file ``<case>.npz`` that exists and lists every array is reused; one that is missing, truncated or
    unreadable is (re-)encoded with a warning line, then written atomically. The first run also writes
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

    items, todo = [], []
    for case in cases:
        name = str(case["case"])
        if not name or os.sep in name or name.startswith("."):
            raise ValueError(f"case name {name!r} cannot name a cache file")
        path = folder / f"{name}.npz"
        if not path.is_file():
            todo.append((case, path))
        elif not _is_readable(path, names):
            logger.warning("%s cache %s: unreadable (truncated?), encoding it again", item_key, path)
            todo.append((case, path))
        items.append({"case": name, item_key: str(path), **{k: v for k, v in case.items() if k not in ("case", item_key)}})

    for case, path in tqdm(todo, desc=f"encoding {item_key}", unit="case", disable=not todo):
        arrays = check(encode_case(case), str(case["case"]))
        # A file object: given a name without ".npz", np.savez would append one.
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    logger.info("%s cache %s: %d reused, %d encoded", item_key, folder, len(items) - len(todo), len(todo))
    return items
