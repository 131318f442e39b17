"""Size limits checked from headers and flags before anything is allocated (prod9_components.limits.MAX_VOXELS),
and a case's volumes on one grid: each failure is one line naming the file, case or flag and the limit."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose

from prod9_components.data.brats import check_case_geometry, prepare_splits
from prod9_components.data.transforms import LoadVolumed, preprocessing, training_crop
from prod9_components.inference.sliding_window import SlidingWindowConfig
from prod9_components.metrics.image_quality import ms_ssim_min_size

LIMIT = r"the limit is 134,217,728 \(512\^3, prod9_components.limits.MAX_VOXELS\)"


def _header_only(path, shape, zooms=(1.0, 1.0, 1.0)) -> str:
    """A ~1 KB .nii whose header claims ``shape`` int16 voxels (the data is mostly missing)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header.set_zooms(zooms)
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + b"\0" * (1024 - 348))
    return str(path)


def _save(path, shape=(8, 8, 8), zooms=(1.0, 1.0, 1.0), affine=None, dtype=np.float32) -> str:
    data = np.zeros(shape, dtype)
    data[1:-1, 1:-1, 1:-1] = 5
    data[2:-2, 2:-2, 2:-2] = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0]) if affine is None else affine), str(path))
    return str(path)


def test_a_header_claiming_2000_cubed_voxels_is_refused_before_reading(tmp_path):
    path = _header_only(tmp_path / "huge.nii", (2000, 2000, 2000))
    assert os.path.getsize(path) == 1024
    message = rf"huge.nii: a grid of \(2000, 2000, 2000\) = 8,000,000,000 voxels; {LIMIT}; check the file's header"
    with pytest.raises(ValueError, match=message):  # the file grid alone, before the run's spacing is known
        LoadVolumed(["image"])({"image": path})
    with pytest.raises(ValueError, match=message):
        LoadVolumed(["image"], spacing=(1.0, 1.0, 1.0))({"image": path})


def test_coarse_voxels_that_resample_to_1600_cubed_are_refused_before_loading(tmp_path):
    """8^3 voxels of 200 mm: 32 KB on disk, 1600^3 = 4.1e9 voxels (16 GB as float32) at the run's 1 mm."""
    path = _save(tmp_path / "coarse.nii.gz", zooms=(200.0, 200.0, 200.0))
    pipeline = Compose(preprocessing(["image"], spacing=(1.0, 1.0, 1.0)))
    with pytest.raises(Exception) as error:
        pipeline({"image": path})
    assert isinstance(error.value.__cause__ or error.value, ValueError)
    assert (f"{path}: (8, 8, 8) voxels of (200.0, 200.0, 200.0) mm resampled to (1.0, 1.0, 1.0) mm give "
            f"(1600, 1600, 1600) = 4,096,000,000 voxels") in str(error.value.__cause__ or error.value)
    # The same file at the run's 25 mm is 64^3: it loads.
    out = Compose(preprocessing(["image"], spacing=(25.0, 25.0, 25.0), k_divisible=1))({"image": path})
    assert max(out["image"].shape[1:]) <= 64


@pytest.mark.parametrize("roi_size, sw_batch_size, flags", [
    ((4096, 4096, 4096), 1, r"--roi-size \[4096, 4096, 4096\] x --sw-batch-size 1 windows per network call = "
                            r"68,719,476,736 voxels"),
    (32, 1_000_000_000, r"--roi-size \[32, 32, 32\] x --sw-batch-size 1000000000 windows per network call = "
                        r"32,768,000,000,000 voxels"),
])
def test_window_size_times_batch_is_checked_where_the_sliding_window_is_set(roi_size, sw_batch_size, flags):
    with pytest.raises(ValueError, match=rf"{flags}; {LIMIT}; lower --roi-size or --sw-batch-size"):
        SlidingWindowConfig(roi_size=roi_size, sw_batch_size=sw_batch_size)
    assert SlidingWindowConfig(roi_size=(128, 128, 128), sw_batch_size=64).sw_batch_size == 64  # 512^3: allowed


def test_a_training_roi_beyond_the_limit_is_refused_before_padding():
    with pytest.raises(ValueError, match=rf"roi_size \(4096, 4096, 4096\) = 68,719,476,736 voxels; {LIMIT}"):
        training_crop(["image"], (4096, 4096, 4096))


def _case(root, name, shape=(8, 8, 8), zooms=(1.0, 1.0, 1.0), affines=None) -> dict:
    case = {"case": name}
    for role in ("t1", "t1ce", "t2", "flair", "seg"):
        affine = (affines or {}).get(role)
        case[role] = _save(root / name / f"{name}_{role}.nii.gz", shape, zooms, affine,
                           np.uint8 if role == "seg" else np.float32)
    return case


def test_modalities_of_a_case_must_share_an_affine(tmp_path):
    shifted = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted[:3, 3] = [0.0, 0.5, 0.0]  # half a voxel: a re-registered or re-cropped volume
    angle = 0.01  # 0.6 degrees about z
    rotated = np.eye(4)
    rotated[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    rounding = np.eye(4) + 2e-6  # float32 header rounding: the same grid
    rounding[3] = [0, 0, 0, 1]
    check_case_geometry([_case(tmp_path, "same", affines={"t2": rounding, "seg": rounding})])
    for name, affine in (("shifted", shifted), ("rotated", rotated)):
        case = _case(tmp_path, name, affines={"flair": affine})
        with pytest.raises(ValueError, match=rf"case {name}: .*{name}_flair.nii.gz has affine .* but .*{name}_t1.nii.gz "
                                             r"has .*; all modalities and seg of a case must share one grid \(within "
                                             r"0.001 mm and 0.0001 in rotation\)"):
            check_case_geometry([case])


def test_cases_too_small_for_validation_are_named_when_the_datalist_is_read(tmp_path):
    """MS-SSIM needs every side >= 28 (kernel 7, three scales); a 20^3 volume at 1 mm, padded to a multiple of 8,
    is 24: that used to fail in validation, after a whole training epoch, without naming the case."""
    data = tmp_path / "data"
    for name in ("BraTS-A", "BraTS-B", "BraTS-C"):
        _case(data, name, shape=(40, 40, 40))
    _case(data, "BraTS-Small", shape=(40, 40, 20))
    checks = {"spacing": (1.0, 1.0, 1.0), "min_side": ms_ssim_min_size(), "k_divisible": 8}
    with pytest.raises(ValueError, match=r"case BraTS-Small: .*BraTS-Small_t1.nii.gz is \(40, 40, 24\) voxels at "
                                         r"\(1.0, 1.0, 1.0\) mm; validation \(MS-SSIM\) needs every side >= 28"):
        prepare_splits(data, tmp_path / "out", **checks)
    assert not (tmp_path / "out" / "datalist.json").exists()
    # At 0.5 mm the same case is 48 voxels deep: accepted, as is 26 voxels that pad to 32.
    prepare_splits(data, tmp_path / "fine", **{**checks, "spacing": (0.5, 0.5, 0.5)})
    check_case_geometry([_case(tmp_path, "padded", shape=(40, 40, 26))], **checks)
