"""NIfTI files as scanners and tools write them, through the real loading path (LoadVolumed and preprocessing):
trailing singleton axes, big-endian data, scaled integers, float64; and read errors that keep the file's name."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from prod9_components.cli.bundle_runner import root_cause
from prod9_components.data.transforms import LoadVolumed, preprocessing

AFFINE = np.array([[-2.0, 0, 0, 30], [0, 2.0, 0, -20], [0, 0, 2.5, 10], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def values():
    """12 x 10 x 8 intensities 0..~1000 with a zero background border (whole numbers: exact in int16)."""
    array = np.zeros((12, 10, 8), np.float32)
    array[2:10, 2:8, 1:7] = np.random.default_rng(0).integers(100, 1000, size=(8, 6, 6))
    return array


def _save(path, array, dtype=None, byte_order="<"):
    header = nib.Nifti1Header().as_byteswapped(byte_order) if byte_order == ">" else None
    image = nib.Nifti1Image(array, AFFINE, header=header)
    if dtype is not None:
        image.set_data_dtype(dtype)
    nib.save(image, str(path))
    return str(path)


def _save_scaled(path, values, slope, inter):
    """int16 counts with the header's scl_slope / scl_inter set by hand (nibabel would pick its own on save)."""
    _save(path, np.rint((values - inter) / slope).astype(np.int16))
    with open(path, "r+b") as f:  # an uncompressed .nii: the header is the first 348 bytes
        header = nib.Nifti1Header.from_fileobj(f)
        header.set_slope_inter(slope, inter)
        f.seek(0)
        f.write(header.binaryblock)
    return str(path)


@pytest.mark.parametrize("kind", ["big-endian float32 .nii", "big-endian int16 .nii.gz", "int16 with scl_slope",
                                  "float64", "trailing singleton axis (X, Y, Z, 1)", "(X, Y, Z, 1, 1)"])
def test_real_world_encodings_load_as_the_same_volume(kind, values, tmp_path):
    path = {
        "big-endian float32 .nii": lambda: _save(tmp_path / "be.nii", values.astype(">f4"), byte_order=">"),
        "big-endian int16 .nii.gz": lambda: _save(tmp_path / "be.nii.gz", values.astype(">i2"), ">i2", ">"),
        # stored int16 counts, real value = 0.5 * count + 5
        "int16 with scl_slope": lambda: _save_scaled(tmp_path / "scaled.nii", values, 0.5, 5.0),
        "float64": lambda: _save(tmp_path / "f64.nii.gz", values.astype(np.float64)),
        "trailing singleton axis (X, Y, Z, 1)": lambda: _save(tmp_path / "single.nii.gz", values[..., None]),
        "(X, Y, Z, 1, 1)": lambda: _save(tmp_path / "single5d.nii", values[..., None, None]),
    }[kind]()
    stored = nib.load(path)
    if "big-endian" in kind:
        assert stored.header.endianness == ">"
    if "scl_slope" in kind:
        assert stored.get_data_dtype() == np.int16 and (stored.dataobj.slope, stored.dataobj.inter) == (0.5, 5.0)
    loaded = LoadVolumed(["image"])({"image": path})["image"]
    assert loaded.dtype == torch.float32 and tuple(loaded.shape) == (1, 12, 10, 8)
    np.testing.assert_allclose(loaded[0].numpy(), values, atol=1e-4)
    np.testing.assert_allclose(loaded.affine.numpy(), AFFINE)
    # And the whole preprocessing (RAS, 2 mm, scaling, crop, pad) gives what the plain little-endian file gives.
    plain = _save(tmp_path / "plain.nii.gz", values)
    pipeline = Compose(preprocessing(["image"], spacing=(2.0, 2.0, 2.0), k_divisible=4))
    expected, out = pipeline({"image": plain})["image"], pipeline({"image": path})["image"]
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-3)


def test_a_big_endian_label_keeps_its_integer_labels(tmp_path):
    labels = np.zeros((6, 6, 6), np.uint16)
    labels[1:3, 1:3, 1:3], labels[3:5, 3:5, 3:5] = 4, 2
    path = _save(tmp_path / "seg.nii.gz", labels.astype(">u2"), ">u2", ">")
    seg = LoadVolumed(["seg"], label_keys=["seg"])({"seg": path})["seg"]
    assert sorted(torch.unique(seg).tolist()) == [0, 2, 4] and int((seg == 4).sum()) == 8


def test_a_multi_channel_volume_is_refused_by_name(values, tmp_path):
    path = _save(tmp_path / "rgb.nii.gz", np.stack([values] * 3, axis=-1))
    with pytest.raises(ValueError, match=r"rgb.nii.gz: expected a 3D volume, got shape \(12, 10, 8, 3\)"):
        LoadVolumed(["image"])({"image": path})


def test_a_truncated_gzip_error_keeps_the_file_name_down_to_its_root_cause(values, tmp_path):
    """The CLI prints an error's innermost cause (``root_cause``); for a truncated gzip that was zlib's
    'Compressed file ended before the end-of-stream marker was reached', with no file name."""
    whole = gzip.compress(open(_save(tmp_path / "whole.nii", values), "rb").read())
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(Exception) as error:
        Compose(preprocessing(["image"], spacing=(2.0, 2.0, 2.0)))({"image": str(path)})
    message = str(root_cause(error.value))
    assert message.startswith(f"{path}: cannot read (") and "end-of-stream" in message
