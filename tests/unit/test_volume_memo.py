"""The in-process memory of resampled volumes (data.volume_memo) behind preprocessing's first step
(transforms.LoadResampled): a recalled item is exactly what the ordinary path gives, inverts like it, and is recalled
only when its files and the couplings between its volumes are what they were."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from prod9_components.data import transforms
from prod9_components.data.transforms import preprocessing
from prod9_components.data.volume_memo import RESAMPLED, Resampled, VolumeMemo

AFFINE = np.array([[-1.0, 0, 0, 20], [0, -1.0, 0, 30], [0, 0, 1.0, -5], [0, 0, 0, 1]])  # 1 mm, LPS-like


@pytest.fixture(autouse=True)
def empty_memo():
    RESAMPLED.clear()
    yield
    RESAMPLED.clear()


@pytest.fixture
def loads(monkeypatch):
    """The files LoadVolumed reads, in order."""
    read = []
    original = transforms.LoadVolumed.load

    def counted(self, path, is_label):
        read.append(str(path))
        return original(self, path, is_label)

    monkeypatch.setattr(transforms.LoadVolumed, "load", counted)
    return read


def save(path, array, affine=AFFINE) -> str:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def textured(shape=(24, 28, 16), seed=0) -> np.ndarray:
    image = np.zeros(shape, np.float32)
    image[3:-3, 4:-4, 2:-2] = np.random.default_rng(seed).uniform(10, 100, (shape[0] - 6, shape[1] - 8, shape[2] - 4))
    return image


def stretched(factor: float) -> np.ndarray:
    """AFFINE with voxels ``factor`` times as large."""
    affine = AFFINE.copy()
    affine[:3, :3] *= factor
    return affine


def same(a: dict, b: dict, keys) -> None:
    for key in keys:
        assert torch.equal(a[key].as_tensor(), b[key].as_tensor()), key
        assert torch.equal(a[key].affine, b[key].affine), key
        assert [op["class"] for op in a[key].applied_operations] == [op["class"] for op in b[key].applied_operations]


def test_a_recalled_item_is_the_ordinary_result_and_inverts_like_it(tmp_path, loads):
    seg = np.zeros((24, 28, 16), np.uint8)
    seg[8:14, 9:15, 5:10] = 2
    seg[10:12, 11:13, 6:8] = 4
    item = {"image": save(tmp_path / "image.nii.gz", textured()), "seg": save(tmp_path / "seg.nii.gz", seg)}
    pipeline = Compose(preprocessing(["image"], ["seg"], spacing=(3.0, 3.0, 3.0), k_divisible=4))
    fresh = pipeline(dict(item))
    assert len(loads) == 2 and len(RESAMPLED) == 2

    recalled = pipeline(dict(item))
    assert len(loads) == 2  # nothing read again
    same(fresh, recalled, ["image", "seg"])
    assert torch.equal(fresh["image_intensity"], recalled["image_intensity"])
    recalled["image"].add_(1.0)  # the caller's copy: changing it leaves the memory alone

    # A new pipeline instance (the next command of the demo) recalls it too, and Invertd maps it back to the file's
    # grid exactly as it maps the ordinary result.
    other = Compose(preprocessing(["image"], ["seg"], spacing=(3.0, 3.0, 3.0), k_divisible=4))
    again = other(dict(item))
    assert len(loads) == 2
    same(fresh, again, ["image", "seg"])
    invert = Invertd(["image", "seg"], transform=other, orig_keys=["image", "seg"], nearest_interp=[False, True])
    back = invert(again)
    expected = Invertd(["image", "seg"], transform=pipeline, orig_keys=["image", "seg"],
                       nearest_interp=[False, True])(fresh)
    for key in ("image", "seg"):
        assert tuple(back[key].shape) == (1, 24, 28, 16)
        np.testing.assert_allclose(back[key].affine.numpy(), AFFINE, atol=1e-5)
        assert torch.equal(back[key].as_tensor(), expected[key].as_tensor())

    # Other settings are another entry.
    pipeline_2mm = Compose(preprocessing(["image"], ["seg"], spacing=(2.0, 2.0, 2.0), k_divisible=4))
    assert pipeline_2mm(dict(item))["image"].shape != fresh["image"].shape and len(loads) == 4


def test_only_the_volumes_not_remembered_are_read_and_the_item_is_the_ordinary_one(tmp_path, loads):
    """Stage 2 preprocesses each case's images with its mask: the images stage 1 resampled one by one are recalled
    and only the mask is read, giving exactly what the ordinary path gives."""
    seg = np.zeros((24, 28, 16), np.uint8)
    seg[8:14, 9:15, 5:10] = 1
    item = {"t1": save(tmp_path / "t1.nii.gz", textured(seed=0)), "t2": save(tmp_path / "t2.nii.gz", textured(seed=1)),
            "seg": save(tmp_path / "seg.nii.gz", seg)}
    pipeline = Compose(preprocessing(["t1", "t2"], ["seg"], spacing=(3.0, 3.0, 3.0), k_divisible=4))
    ordinary = pipeline(dict(item))
    RESAMPLED.clear()
    alone = Compose(preprocessing(["image"], spacing=(3.0, 3.0, 3.0), k_divisible=4))
    for key in ("t1", "t2"):
        alone({"image": item[key]})
    del loads[:]

    partial = pipeline(dict(item))
    assert loads == [item["seg"]]
    same(ordinary, partial, ["t1", "t2", "seg"])
    invert = Invertd(["t1", "seg"], transform=pipeline, orig_keys=["t1", "seg"], nearest_interp=[False, True])
    for key, back in ((key, invert(dict(partial))[key]) for key in ("t1", "seg")):
        assert torch.equal(back.as_tensor(), invert(dict(ordinary))[key].as_tensor()) and back.shape[1:] == (24, 28, 16)
    pipeline(dict(item))
    assert len(loads) == 1  # now all of it is remembered


def test_a_rewritten_file_is_read_again(tmp_path, loads):
    path = tmp_path / "image.nii"  # uncompressed: the new file has the old one's size
    save(path, textured(seed=0))
    pipeline = Compose(preprocessing(["image"], spacing=(2.0, 2.0, 2.0), k_divisible=1))
    first = pipeline({"image": str(path)})["image"]
    save(path, textured(seed=1))
    second = pipeline({"image": str(path)})["image"]
    assert len(loads) == 2 and not torch.equal(first.as_tensor(), second.as_tensor())
    RESAMPLED.clear()
    assert torch.equal(pipeline({"image": str(path)})["image"].as_tensor(), second.as_tensor())


def test_a_file_rewritten_while_it_is_read_is_not_remembered(tmp_path, monkeypatch):
    path = save(tmp_path / "image.nii.gz", textured(seed=0))
    original = transforms.LoadVolumed.load

    def load_then_rewrite(self, file, is_label):  # another process writes the file while this one resamples it
        volume = original(self, file, is_label)
        save(path, textured(seed=1))
        return volume

    monkeypatch.setattr(transforms.LoadVolumed, "load", load_then_rewrite)
    Compose(preprocessing(["image"], spacing=(2.0, 2.0, 2.0), k_divisible=1))({"image": path})
    assert len(RESAMPLED) == 0


def test_spacing_couplings_decide_what_is_recalled(tmp_path, loads):
    """Spacingd gives an item's volume with the first one's input shape and voxel size the first one's output shape:
    a volume remembered alone is not recalled into an item that would reshape it, nor a reshaped one alone."""
    a = save(tmp_path / "a.nii.gz", textured(seed=0))
    # The same shape, voxels 0.0009 mm larger (the same size to Spacingd, within 1e-3): 2 mm voxels round up on b.
    b = save(tmp_path / "b.nii.gz", textured(seed=1), stretched(1.0009))
    resample = transforms.LoadResampled(["a", "b"], spacing=(2.0, 2.0, 2.0))
    alone_a = transforms.LoadResampled(["a"], spacing=(2.0, 2.0, 2.0))({"a": a})["a"]
    alone_b = transforms.LoadResampled(["a"], spacing=(2.0, 2.0, 2.0))({"a": b})["a"]
    assert alone_b.shape != alone_a.shape  # on its own, b's grid is a voxel larger
    pair = resample({"a": a, "b": b})
    assert len(loads) == 4 and pair["b"].shape == alone_a.shape  # Spacingd gave b the shape of a

    RESAMPLED.clear()
    ordinary = resample({"a": a, "b": b})
    same(pair, ordinary, ["a", "b"])
    recalled = resample({"a": a, "b": b})
    assert len(loads) == 6  # the pair is recalled ...
    same(recalled, ordinary, ["a", "b"])
    b_again = transforms.LoadResampled(["a"], spacing=(2.0, 2.0, 2.0))({"a": b})["a"]
    assert len(loads) == 7 and torch.equal(b_again.as_tensor(), alone_b.as_tensor())  # ... b alone is not
    c = save(tmp_path / "c.nii.gz", textured((20, 28, 16)))  # another shape: b keeps its own behind it
    resample({"a": a, "b": b})  # b given a's shape again
    assert torch.equal(resample({"a": c, "b": b})["b"].as_tensor(), alone_b.as_tensor())


def test_a_label_on_another_grid_is_never_remembered(tmp_path, loads, caplog):
    image = save(tmp_path / "image.nii.gz", textured())
    seg = np.zeros((48, 56, 32), np.uint8)
    seg[16:28, 18:30, 10:20] = 1
    fine = AFFINE.copy()
    fine[:3, :3] /= 2
    mask = save(tmp_path / "seg_fine.nii.gz", seg, fine)
    pipeline = Compose(preprocessing(["image"], ["seg"], spacing=(2.0, 2.0, 2.0), k_divisible=1))
    with caplog.at_level("WARNING", logger="prod9"):
        first = pipeline({"image": image, "seg": mask})
        second = pipeline({"image": image, "seg": mask})
    assert caplog.text.count("seg_fine.nii.gz: grid (48, 56, 32) differs") == 2  # never silent
    # The second call read the mask alone (beside the remembered image), found it on another grid and went the
    # ordinary way: 2 + 1 + 2 reads; a third reads only what the ordinary path reads.
    assert len(loads) == 5
    pipeline({"image": image, "seg": mask})
    assert len(loads) == 7
    same(first, second, ["image", "seg"])
    # Behind an image on its own grid the mask stays where it is: what was made of it behind the other image is
    # not what this item gets.
    fine_image = save(tmp_path / "image_fine.nii.gz", textured((48, 56, 32)), fine)
    Compose(preprocessing(["image"], spacing=(2.0, 2.0, 2.0), k_divisible=1))({"image": fine_image})
    remembered = pipeline({"image": fine_image, "seg": mask})
    RESAMPLED.clear()
    same(remembered, pipeline({"image": fine_image, "seg": mask}), ["image", "seg"])


def test_the_memory_is_bounded():
    def entry(voxels: int) -> Resampled:
        grid = ((voxels, 1, 1), np.eye(4))
        return Resampled.of(MetaTensor(torch.zeros(1, voxels, 1, 1)), grid, ((voxels, 1, 1), np.ones(3)), False)

    memo = VolumeMemo(max_bytes=3 * 400, largest=800)
    for name in "abcd":
        memo.put((name,), entry(100))  # 400 bytes each
    assert len(memo) == 3 and memo.nbytes == 1200 and memo.get(("a",)) is None and memo.get(("d",)) is not None
    memo.put(("big",), entry(201))  # above `largest`: not kept
    assert memo.get(("big",)) is None and len(memo) == 3
    memo.put(("d",), entry(50))  # replacing an entry counts its new size
    assert memo.nbytes == 1000
    assert memo.key(torch.zeros(3), "settings") is None and memo.key("/no/such/file.nii.gz", "settings") is None


def test_a_file_larger_than_the_memory_is_not_hashed(tmp_path):
    small, large = tmp_path / "small.nii", tmp_path / "large.nii"
    small.write_bytes(b"x" * 1000)
    large.write_bytes(b"x" * 1001)
    memo = VolumeMemo(max_bytes=1000)
    assert memo.key(small, "settings") is not None and memo.key(large, "settings") is None
