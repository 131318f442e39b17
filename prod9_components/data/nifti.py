"""NIfTI volumes as scanners and tools really write them: the header read and checked first, then the data.

Accepted beyond the BraTS files: a trailing axis of size 1 (X, Y, Z, 1) is a 3D volume; big-endian data, scaled
integers (``scl_slope``/``scl_inter``) and float64 load like any other volume. A true multi-channel or time-series
file (X, Y, Z, 3) is refused by name: prod9 expects one modality per file.

The data itself is read by ``transforms.LoadVolumed`` (big-endian data converted to native byte order there);
this module needs only nibabel, so the datalist checks stay light. Every error is one line that starts with the
file's name, and is raised ``from None``: the CLI reports an error's innermost cause, which for a truncated gzip
would otherwise be nibabel's message without any file name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from prod9_components.limits import MAX_VOXELS, check_voxels, voxel_count


@dataclass(frozen=True, eq=False)
class VolumeHeader:
    """What the header says about a volume, read without touching its data.

    Attributes:
        path: the file.
        shape: (X, Y, Z) voxels (a trailing axis of size 1 dropped).
        zooms: (X, Y, Z) voxel size in mm.
        affine: (4, 4) voxel -> world (mm) matrix, nibabel's choice of sform / qform.
    """

    path: str
    shape: tuple[int, int, int]
    zooms: tuple[float, float, float]
    affine: np.ndarray

    def resampled_shape(self, spacing: Sequence[float]) -> tuple[int, int, int]:
        """Voxels per axis after resampling to ``spacing`` mm (an upper bound of what MONAI's ``Spacingd`` gives).

        Raises:
            ValueError: the header's voxel sizes are not positive finite numbers.
        """
        if not all(math.isfinite(z) and z > 0 for z in self.zooms):
            raise ValueError(f"{self.path}: voxel size {self.zooms} mm; expected positive finite voxel sizes in the "
                             "NIfTI header")
        # 1e-6: 48 voxels of 5 mm are exactly 60 voxels of 4 mm, whatever the float rounding of the header.
        return tuple(max(1, math.ceil(n * z / float(s) - 1e-6)) for n, z, s in zip(self.shape, self.zooms, spacing))


def read_header(path: str | os.PathLike) -> VolumeHeader:
    """Read and check a NIfTI header: a 3D volume, or 3D with trailing axes of size 1.

    Raises:
        ValueError: ``"{path}: cannot read (...)"`` or ``"{path}: expected a 3D volume, got shape ..."``.
    """
    path = str(path)
    try:
        image = nib.load(path)
        shape = tuple(int(s) for s in image.shape)
        zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel raises several types for corrupt headers
        raise ValueError(f"{path}: cannot read ({' '.join(str(error).split()) or type(error).__name__})") from None
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise ValueError(f"{path}: expected a 3D volume, got shape {shape} (one modality per file; a trailing axis "
                         "of size 1 is accepted)")
    return VolumeHeader(path, shape[:3], zooms[:3], affine)


def check_volume_size(header: VolumeHeader, spacing: Sequence[float] | None, limit: int = MAX_VOXELS) -> None:
    """Refuse a volume whose file grid, or whose grid after resampling to ``spacing`` mm, exceeds ``limit`` voxels.

    Raises:
        ValueError: naming the file, its grid, the resampled grid and the limit.
    """
    check_voxels(voxel_count(header.shape), f"{header.path}: a grid of {header.shape}",
                 "check the file's header", limit)
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        resampled = header.resampled_shape(spacing)
        check_voxels(voxel_count(resampled),
                     f"{header.path}: {header.shape} voxels of {tuple(round(z, 4) for z in header.zooms)} mm resampled "
                     f"to {spacing} mm give {resampled}",
                     "check the voxel size in the file's header, or run at a coarser spacing", limit)
