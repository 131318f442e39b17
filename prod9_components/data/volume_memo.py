"""What loading and resampling made of a volume file, remembered within one process.

Why: the demo runs each family's commands in one process (``scripts/demo.py``), and every command preprocesses
the same cases again: loading, low-pass and resampling 1 mm -> 4 mm cost ~0.3 s a volume (the commands' set-up before
their engines start went from 72 to 55 s a family with this memory, and to 34-36 s once a stage-2 cache read only each
case's mask beside the images stage 1 had left here and the low-pass kept to the brain's box; the tests' engines read
faster too). A file is
known by its path and the SHA-256 of its bytes (~2 ms for a BraTS volume), together with the settings it was
resampled with: a rewritten file, or other settings, is another entry. Bounded in bytes (the oldest entries go
first), and only small volumes (coarse grids) are kept, so a run at 1 mm holds almost nothing. Thread-safe:
``CacheDataset`` fills its cache from a pool of threads.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
from monai.data import MetaTensor
from monai.utils import TraceKeys

from prod9_components.data.case_cache import file_sha256

MEMO_BYTES = 256 * 2**20  # ~450 BraTS volumes at 4 mm (0.56 MB each), ~55 at 2 mm
LARGEST_VOLUME_BYTES = 8 * 2**20  # a 2 mm BraTS volume is 4.5 MB; at 1 mm (36 MB) nothing is kept


@dataclass(frozen=True)
class Resampled:
    """One volume after resampling and what decided its result beside its file (see
    :class:`~prod9_components.data.transforms.LoadResampled`).

    Attributes:
        volume: (C, X, Y, Z) MetaTensor on the target grid; its trace has no transform IDs (``TraceKeys.NONE``), so
            any instance of the same transforms inverts it.
        file_grid: the file's (spatial shape, affine), which ``MatchLabelGridd`` compares a label's with.
        resampled_from: the (spatial shape, voxel size) ``Spacingd`` saw, which its ``ensure_same_shape`` compares.
        shape_forced: whether ``Spacingd`` gave it the first volume's output shape instead of its own.
    """

    volume: MetaTensor
    file_grid: tuple[tuple[int, ...], np.ndarray]
    resampled_from: tuple[tuple[int, ...], np.ndarray]
    shape_forced: bool

    @property
    def nbytes(self) -> int:
        return self.volume.element_size() * self.volume.nelement()

    def copy(self) -> MetaTensor:
        """A copy of :attr:`volume` the caller may change (data, meta and trace)."""
        return MetaTensor(self.volume.as_tensor().clone(), meta=copy.deepcopy(self.volume.meta),
                          applied_operations=copy.deepcopy(self.volume.applied_operations))

    @classmethod
    def of(cls, volume: MetaTensor, file_grid, resampled_from, shape_forced: bool) -> Resampled:
        """Remember a copy of ``volume`` with its trace's transform IDs cleared."""
        operations = [{**op, TraceKeys.ID: TraceKeys.NONE} for op in copy.deepcopy(volume.applied_operations)]
        kept = MetaTensor(volume.as_tensor().clone(), meta=copy.deepcopy(volume.meta), applied_operations=operations)
        return cls(kept, file_grid, resampled_from, shape_forced)


class VolumeMemo:
    """``{(file identity, settings): Resampled}``, at most ``max_bytes`` of volumes, none above ``largest``."""

    def __init__(self, max_bytes: int = MEMO_BYTES, largest: int = LARGEST_VOLUME_BYTES) -> None:
        self.max_bytes, self.largest = int(max_bytes), int(largest)
        self._entries: OrderedDict[tuple, Resampled] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def key(self, path: object, settings: Hashable) -> tuple | None:
        """The entry's key for the file at ``path`` (as given: a copy names it) read with ``settings``; None when
        ``path`` is not a readable file (an in-memory array, a missing file: the ordinary path then reports it) or
        is larger than the whole memory (not hashed: a huge file costs the ordinary path only what it reads)."""
        if not isinstance(path, (str, os.PathLike)):
            return None
        try:
            if os.path.getsize(path) > self.max_bytes:
                return None
            return os.fspath(path), file_sha256(path), settings
        except (OSError, ValueError):
            return None

    def get(self, key: tuple | None) -> Resampled | None:
        if key is None:
            return None
        with self._lock:
            return self._entries.get(key)

    def put(self, key: tuple | None, entry: Resampled) -> None:
        size = entry.nbytes
        if key is None or size > min(self.largest, self.max_bytes):
            return
        with self._lock:
            old = self._entries.pop(key, None)
            self._bytes += size - (0 if old is None else old.nbytes)
            self._entries[key] = entry
            while self._bytes > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes


RESAMPLED = VolumeMemo()  # the process's memo, shared by every preprocessing pipeline
