"""Size limits checked before anything is allocated, so a bad header or flag fails in one line, not in MemoryError.

``MAX_VOXELS`` bounds both a volume (on its file's grid and after resampling to the run's spacing) and one
sliding-window network call (``roi_size`` voxels x ``sw_batch_size`` windows). 512^3 voxels is 0.5 GB as float32:
about 60 BraTS volumes at 1 mm (240 x 240 x 155), or a whole 0.5 mm head; a model's activations are tens of times
the input, so anything above it does not fit in memory anyway. A header claiming 2000^3 voxels (a 1 KB file), 8^3
voxels of 200 mm (1600^3 at 1 mm) or ``--roi-size 4096 4096 4096`` used to allocate tens to hundreds of GB first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_VOXELS = 512**3


def check_voxels(count: int, what: str, fix: str, limit: int = MAX_VOXELS) -> None:
    """Raise ``ValueError("{what} = N voxels; the limit is M (512^3, ...); {fix}")`` when ``count > limit``."""
    if count > limit:
        cube = round(limit ** (1 / 3))
        size = f"{cube}^3, " if cube**3 == limit else ""
        raise ValueError(f"{what} = {count:,} voxels; the limit is {limit:,} ({size}prod9_components.limits."
                         f"MAX_VOXELS); {fix}")


def voxel_count(shape: Sequence[int]) -> int:
    """Exact product of ``shape`` (Python ints: no overflow, unlike a fixed-width numpy product)."""
    return math.prod(int(n) for n in shape)
