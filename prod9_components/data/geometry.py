"""Checks of a case's volumes as a set, from their NIfTI headers only, when the datalist is read.

A case's modalities and seg must lie on one grid: the same shape and the same affine (voxel -> world), within
``AFFINE_MM_TOLERANCE`` mm for the voxel sizes and origin and ``AFFINE_ROTATION_TOLERANCE`` for the direction
cosines (float32 header rounding is ~1e-6; a real re-registration or a flipped axis is far above both). Given the
run's spacing, each volume must fit :data:`~prod9_components.limits.MAX_VOXELS` after resampling and reach the
smallest size validation needs (MS-SSIM), so a bad case is named before training instead of after an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from prod9_components.data.modalities import MODALITIES
from prod9_components.data.nifti import VolumeHeader, check_volume_size, read_header
from prod9_components.limits import MAX_VOXELS

AFFINE_MM_TOLERANCE = 1e-3
AFFINE_ROTATION_TOLERANCE = 1e-4


def same_grid(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two (4, 4) affines describe one grid: voxel sizes and origin within ``AFFINE_MM_TOLERANCE`` mm,
    direction cosines within ``AFFINE_ROTATION_TOLERANCE``."""
    zooms_a, zooms_b = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not (np.all(zooms_a > 0) and np.all(zooms_b > 0)):
        return bool(np.allclose(a, b, atol=AFFINE_MM_TOLERANCE, rtol=0))
    return bool(np.allclose(zooms_a, zooms_b, atol=AFFINE_MM_TOLERANCE, rtol=0)
                and np.allclose(a[:3, 3], b[:3, 3], atol=AFFINE_MM_TOLERANCE, rtol=0)
                and np.allclose(a[:3, :3] / zooms_a, b[:3, :3] / zooms_b, atol=AFFINE_ROTATION_TOLERANCE, rtol=0))


def _check_min_side(header: VolumeHeader, case: str, spacing: Sequence[float], min_side: int, k_divisible: int) -> None:
    # The resampled grid padded to the network's multiple is the largest the volume can be at validation (the
    # foreground crop only shrinks it): below min_side it certainly fails there.
    padded = tuple(math.ceil(n / k_divisible) * k_divisible for n in header.resampled_shape(spacing))
    if min(padded) < min_side:
        raise ValueError(
            f"case {case}: {header.path} is {padded} voxels at {tuple(float(s) for s in spacing)} mm; validation "
            f"(MS-SSIM) needs every side >= {min_side}: use a finer spacing or leave the case out")


def check_case_geometry(
    cases: Iterable[Mapping],
    spacing: Sequence[float] | None = None,
    min_side: int = 0,
    k_divisible: int = 1,
    max_voxels: int = MAX_VOXELS,
) -> None:
    """Check, from the NIfTI headers only, that each case's volumes are 3D and share one grid (shape and affine).

    Args:
        cases: dicts of paths by role (``t1``, ``t1ce``, ``t2``, ``flair``, ``seg``) and ``case`` (the name).
        spacing: the run's voxel size (mm); with it, each volume must fit ``max_voxels`` once resampled.
        min_side: with ``spacing``, the smallest side validation accepts (e.g. ``metrics.ms_ssim_min_size()``),
            after padding to a multiple of ``k_divisible`` (the network's downsampling); 0 checks nothing.

    Raises:
        ValueError: naming the case, the offending file(s) and what was expected.
    """
    for case in cases:
        reference = None
        for role in (*MODALITIES, "seg"):
            if role not in case:
                continue
            header = read_header(case[role])
            if reference is None:
                reference = header
            elif header.shape != reference.shape:
                raise ValueError(
                    f"case {case.get('case', '?')}: {header.path} has shape {header.shape} but {reference.path} has "
                    f"shape {reference.shape}; all modalities and seg of a case must share one grid"
                )
            elif not same_grid(header.affine, reference.affine):
                raise ValueError(
                    f"case {case.get('case', '?')}: {header.path} has affine {_rows(header.affine)} but "
                    f"{reference.path} has {_rows(reference.affine)}; all modalities and seg of a case must share one "
                    f"grid (within {AFFINE_MM_TOLERANCE} mm and {AFFINE_ROTATION_TOLERANCE} in rotation)"
                )
            if spacing is not None:
                check_volume_size(header, spacing, max_voxels)
                if min_side and role != "seg":
                    _check_min_side(header, case.get("case", "?"), spacing, int(min_side), max(1, int(k_divisible)))


def _rows(affine: np.ndarray) -> str:
    """The top three rows of an affine on one line, rounded to 0.1 um."""
    return str(np.round(affine[:3], 4).tolist())
