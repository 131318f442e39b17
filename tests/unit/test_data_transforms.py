"""Preprocessing transforms: loading errors, robust scaling and its inverse, labels, crops, invertibility."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Spacingd
from scipy.ndimage import gaussian_filter

from prod9_components.data.brats import discover_cases
from prod9_components.data.transforms import (
    AntiAliasd,
    low_pass,
    LoadVolumed,
    MapBraTSLabelsd,
    RobustIntensityScaled,
    preprocessing,
    preprocessing_contract,
    restore_intensity,
    training_crop,
)

# 2 mm voxels with x and y flipped (LPS-like) and an offset origin: a non-trivial input grid.
LPS_AFFINE = np.array([[-2.0, 0, 0, 50], [0, -2.0, 0, 60], [0, 0, 2.0, -20], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def lps_volume(tmp_path_factory):
    """A 33x41x25 image (2 mm, LPS-ish affine) with a textured box and a nested BraTS-2021 label box."""
    root = tmp_path_factory.mktemp("lps")
    rng = np.random.default_rng(0)
    image = np.zeros((33, 41, 25), np.float32)
    image[5:28, 6:35, 4:20] = rng.uniform(10, 100, size=(23, 29, 16))
    seg = np.zeros(image.shape, np.uint8)
    seg[10:20, 10:20, 8:14] = 2
    seg[12:18, 12:18, 9:13] = 4
    seg[14:16, 14:16, 10:12] = 1
    nib.save(nib.Nifti1Image(image, LPS_AFFINE), str(root / "image.nii.gz"))
    nib.save(nib.Nifti1Image(seg, LPS_AFFINE), str(root / "seg.nii.gz"))
    return {"image": str(root / "image.nii.gz"), "seg": str(root / "seg.nii.gz"), "array": image, "labels": seg}


def test_preprocessing_is_flat_and_invertible(lps_volume):
    transforms = preprocessing(("image",), ("seg",), spacing=(1.0, 1.0, 1.0), k_divisible=8)
    assert not any(isinstance(t, Compose) for t in transforms)  # CacheDataset needs a flat list
    pipeline = Compose(transforms)
    out = pipeline({"image": lps_volume["image"], "seg": lps_volume["seg"]})
    image, seg = out["image"], out["seg"]
    assert image.dtype == torch.float32 and image.shape[0] == 1
    assert all(s % 8 == 0 for s in image.shape[1:]) and seg.shape == image.shape
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    assert sorted(torch.unique(seg).tolist()) == [0.0, 1.0, 2.0, 3.0]  # 4 -> 3
    np.testing.assert_allclose(np.diag(image.affine.numpy())[:3], [1.0, 1.0, 1.0])  # RAS, 1 mm
    # Foreground crop: the 23x29x16 box at 2 mm is ~45x57x31 at 1 mm, plus margin 2, padded to 8.
    assert tuple(image.shape[1:]) == (56, 64, 40)

    invert = Invertd(["image", "seg"], transform=pipeline, orig_keys=["image", "seg"], nearest_interp=[False, True])
    restored = invert(out)
    assert tuple(restored["image"].shape) == (1, 33, 41, 25)
    np.testing.assert_allclose(restored["image"].affine.numpy(), LPS_AFFINE, atol=1e-5)
    np.testing.assert_allclose(restored["seg"].affine.numpy(), LPS_AFFINE, atol=1e-5)
    # 2 mm voxel centres lie on the 1 mm grid, so nearest-neighbour labels come back exactly (4 mapped to 3).
    expected_seg = np.where(lps_volume["labels"] == 4, 3, lps_volume["labels"])
    np.testing.assert_array_equal(restored["seg"][0].numpy(), expected_seg)
    # Intensities come back too, once the robust scaling is undone.
    low, high = out["image_intensity"].tolist()
    values = restore_intensity(restored["image"][0].as_tensor(), low, high).numpy()
    inside = (slice(6, 27), slice(7, 34), slice(5, 19))
    np.testing.assert_allclose(values[inside], lps_volume["array"][inside], rtol=0.03, atol=1.0)


def test_preprocessing_demo_case_minus_one_to_one(demo_dataset_dir):
    case = discover_cases(demo_dataset_dir)[0]
    pipeline = Compose(preprocessing(("t1", "flair"), ("seg",), spacing=(5.0, 5.0, 5.0), intensity_range=(-1.0, 1.0)))
    out = pipeline({k: case[k] for k in ("t1", "flair", "seg")})
    t1 = out["t1"]
    assert t1.shape == out["flair"].shape == out["seg"].shape
    assert all(s % 8 == 0 for s in t1.shape[1:])
    assert float(t1.min()) == -1.0 and float(t1.max()) == 1.0
    assert 0.3 < float((t1 > -1).float().mean()) < 0.9  # cropped to the brain, padding with -1
    assert set(torch.unique(out["seg"]).tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert out["t1_intensity"].shape == (2,) and out["t1_intensity"][1] > out["t1_intensity"][0] > 0


def test_robust_intensity_scaling_numbers_and_inverse():
    values = np.zeros((1, 10, 10, 10), np.float32)
    values[0, 1:9, 1:9, 1:9] = np.linspace(1.0, 512.0, 512).reshape(8, 8, 8)  # min 0 = background
    scaler = RobustIntensityScaled(["image"], lower=10.0, upper=90.0, output_range=(-1.0, 1.0))
    out = scaler({"image": torch.from_numpy(values)})
    low, high = np.percentile(np.linspace(1.0, 512.0, 512), (10.0, 90.0))
    np.testing.assert_allclose(out["image_intensity"].numpy(), [low, high], rtol=1e-6)
    expected = np.clip((values - low) / (high - low), 0, 1) * 2 - 1
    np.testing.assert_allclose(out["image"].numpy(), expected, atol=1e-6)
    assert float(out["image"][0, 0, 0, 0]) == -1.0
    restored = restore_intensity(out["image"], low, high, output_range=(-1.0, 1.0)).numpy()
    unclipped = (values >= low) & (values <= high)
    np.testing.assert_allclose(restored[unclipped], values[unclipped], rtol=1e-5)


def test_robust_intensity_scaling_rejects_constant_volume(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.full((6, 6, 6), 7.0, np.float32), np.eye(4)), str(path))
    loaded = LoadVolumed(["image"])({"image": str(path)})
    with pytest.raises(ValueError, match=r"flat.nii.gz: constant intensity"):
        RobustIntensityScaled(["image"])(loaded)


def _save(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return str(path)


def test_load_volume_errors(tmp_path, lps_volume):
    load = LoadVolumed(["image"])
    raw = open(lps_volume["image"], "rb").read()
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"truncated.nii.gz: cannot read \("):
        load({"image": str(tmp_path / "truncated.nii.gz")})
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti" * 40)
    with pytest.raises(ValueError, match=r"garbage.nii.gz: cannot read \("):
        load({"image": str(tmp_path / "garbage.nii.gz")})
    with pytest.raises(ValueError, match=r"flat.nii.gz: expected a 3D volume, got shape \(8, 9\)"):
        load({"image": _save(tmp_path / "flat.nii.gz", np.ones((8, 9), np.float32))})
    with pytest.raises(ValueError, match=r"series.nii: expected a 3D volume, got shape \(4, 4, 4, 3\)"):
        load({"image": _save(tmp_path / "series.nii", np.ones((4, 4, 4, 3), np.float32))})
    bad = np.ones((6, 6, 6), np.float32)
    bad[0, 0, :2] = np.nan
    bad[1, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"nan.nii.gz: 3 NaN/Inf voxels"):
        load({"image": _save(tmp_path / "nan.nii.gz", bad)})


def test_load_volume_types_and_label_errors(lps_volume, tmp_path):
    out = LoadVolumed(["image", "seg"], label_keys=["seg"])({"image": lps_volume["image"], "seg": lps_volume["seg"]})
    assert out["image"].dtype == torch.float32 and out["image"].shape == (1, 33, 41, 25)
    assert out["seg"].dtype == torch.uint8 and sorted(torch.unique(out["seg"]).tolist()) == [0, 1, 2, 4]
    np.testing.assert_allclose(out["image"].affine.numpy(), LPS_AFFINE)
    bad = _save(tmp_path / "bad_seg.nii.gz", np.full((4, 4, 4), 6, np.uint8))
    loaded = LoadVolumed(["seg"], label_keys=["seg"])({"seg": bad})
    with pytest.raises(ValueError, match=r"bad_seg.nii.gz: unexpected tumour label values \[6\]"):
        MapBraTSLabelsd(["seg"])(loaded)


def test_training_crop_pads_and_crops_consistently():
    image = torch.arange(20 * 12 * 6, dtype=torch.float32).reshape(1, 20, 12, 6)
    label = (image % 7 == 0).float()
    crop = Compose(training_crop(["image", "label"], (16, 16, 8), background=-1.0, label_keys=["label"]))
    crop.set_random_state(seed=0)
    out = crop({"image": image, "label": label})
    assert out["image"].shape == out["label"].shape == (1, 16, 16, 8)
    pad = out["image"] == -1.0
    assert int(pad.sum()) == 16 * 16 * 8 - 16 * 12 * 6  # y and z padded with the background value
    assert float(out["label"][pad].abs().sum()) == 0.0  # labels padded with 0
    real = ~pad
    np.testing.assert_array_equal(out["label"][real].numpy(), (out["image"][real] % 7 == 0).float().numpy())


def test_preprocessing_contract_is_json():
    contract = preprocessing_contract((1, 1, 1.5), (-1, 1))
    assert json.loads(json.dumps(contract)) == {
        "orientation": "RAS",
        "spacing": [1.0, 1.0, 1.5],
        "anti_aliasing": "gaussian, sigma (target / source spacing - 1) / 2",
        "intensity": {"method": "robust_percentile", "lower": 0.5, "upper": 99.5, "range": [-1.0, 1.0]},
    }


def test_a_mask_on_another_grid_is_resampled_onto_its_image(lps_volume, tmp_path, caplog):
    """A user's mask saved at 1 mm beside a 2 mm image: preprocessing resamples it (nearest) onto the image's grid
    first, says so in one log line, and the labels land where they were in world space."""
    from prod9_components.data.transforms import MatchLabelGridd

    labels = lps_volume["labels"]
    fine = np.repeat(np.repeat(np.repeat(labels, 2, 0), 2, 1), 2, 2)  # each 2 mm voxel -> 2x2x2 voxels of 1 mm
    affine = LPS_AFFINE.copy()
    affine[:3, :3] /= 2
    affine[:3, 3] -= LPS_AFFINE[:3, :3] @ np.full(3, 0.25)  # 1 mm voxel centres inside the 2 mm voxels
    nib.save(nib.Nifti1Image(fine, affine), str(tmp_path / "seg_1mm.nii.gz"))
    load = LoadVolumed(["image", "seg"], label_keys=["seg"])
    data = load({"image": lps_volume["image"], "seg": str(tmp_path / "seg_1mm.nii.gz")})
    with caplog.at_level("WARNING", logger="prod9"):
        matched = MatchLabelGridd(["seg"], "image")(data)["seg"]
    assert matched.shape == (1, *labels.shape) and "seg_1mm.nii.gz: grid (66, 82, 50) differs" in caplog.text
    assert np.array_equal(matched[0].numpy(), labels)  # every label back on its voxel
    same = load({"image": lps_volume["image"], "seg": lps_volume["seg"]})
    caplog.clear()
    with caplog.at_level("WARNING", logger="prod9"):
        assert MatchLabelGridd(["seg"], "image")(same)["seg"] is same["seg"]  # the same grid: untouched
    assert not caplog.text
    out = Compose(preprocessing(("image",), ("seg",), spacing=(2.0, 2.0, 2.0), k_divisible=1))(
        {"image": lps_volume["image"], "seg": str(tmp_path / "seg_1mm.nii.gz")})
    assert out["seg"].shape == out["image"].shape


def test_anti_aliasing_keeps_the_local_mean_when_downsampling():
    """A 1 mm stripe pattern of period 4 resampled to 4 mm: without the low-pass every coarse voxel lands on one
    phase of the stripes (a flat 0 or 1 image, or stripes at a false frequency); with it, every voxel is the local
    mean 0.5. At the file's own spacing the transform changes nothing."""
    stripes = (torch.arange(64) % 4 < 2).float()
    volume = MetaTensor(stripes[:, None, None].expand(64, 8, 8)[None].clone(), affine=torch.eye(4))
    coarse = Spacingd(["image"], pixdim=(4.0, 1.0, 1.0), mode="bilinear")
    aliased = coarse({"image": volume.clone()})["image"][0, 2:-2, 4, 4]
    smoothed = coarse(AntiAliasd(["image"], (4.0, 1.0, 1.0))({"image": volume.clone()}))["image"][0, 2:-2, 4, 4]
    assert float((aliased - 0.5).abs().mean()) > 0.4
    assert float((smoothed - 0.5).abs().max()) < 0.05
    same = AntiAliasd(["image"], (1.0, 1.0, 1.0))({"image": volume.clone()})["image"]
    assert torch.equal(same, volume)
    assert isinstance(same, MetaTensor)


def test_the_low_pass_filters_around_the_non_zero_voxels_only_and_gives_the_whole_volume_s_result():
    """Boxes of noise in a zero background, some touching the volume's edges, some axes not smoothed: the same bits
    as scipy's Gaussian over the whole volume; an all-zero volume stays zero."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        volume = np.zeros((20, 17, 13), np.float32)
        lo = rng.integers(0, 10, 3)
        hi = np.minimum(lo + rng.integers(1, 12, 3), volume.shape)
        volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.normal(size=tuple(hi - lo))
        sigma = rng.uniform(0.3, 3.0, 3) * (rng.random(3) > 0.2)
        expected = gaussian_filter(volume, sigma, mode="nearest", truncate=3.0)
        out = np.zeros_like(volume)
        low_pass(volume, sigma, out)
        assert np.array_equal(out, expected), (lo, hi, sigma)
    out = np.zeros((9, 9, 9), np.float32)
    low_pass(np.zeros_like(out), [1.5, 1.5, 1.5], out)
    assert not out.any()


def test_anti_aliasing_refuses_a_degenerate_header_and_bounds_its_kernel():
    """A NaN voxel size is refused naming the file; a header claiming 1e-6 mm voxels (a kernel of millions of taps)
    costs no more than smoothing over the whole axis."""
    flat = MetaTensor(torch.zeros(1, 8, 8, 8), affine=torch.diag(torch.tensor([float("nan"), 1.0, 1.0, 1.0])),
                      meta={"filename_or_obj": "bad.nii.gz"})
    with pytest.raises(ValueError, match="bad.nii.gz: voxel size"):
        AntiAliasd(["image"], (4.0, 4.0, 4.0))({"image": flat})
    tiny = MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.diag(torch.tensor([1e-6, 1e-6, 1e-6, 1.0])))
    out = AntiAliasd(["image"], (4.0, 4.0, 4.0))({"image": tiny})["image"]
    assert out.shape == tiny.shape and float(out.std()) < 0.5 * float(tiny.std())
