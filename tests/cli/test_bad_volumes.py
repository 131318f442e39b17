"""Volumes that used to fail late (after an epoch, or deep in MONAI) are named before training starts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from tests.helpers import ROOT, cli

TINY = ROOT / "bundles" / "maskgit_stage1" / "configs" / "tiny.json"


def _dataset(root, shapes: dict) -> None:
    """BraTS 2021 layout, 1 mm volumes of the given shapes with a bright box inside."""
    for name, shape in shapes.items():
        data = np.zeros(shape, np.float32)
        data[2:-2, 2:-2, 2:-2] = np.random.default_rng(0).uniform(100, 200, size=[n - 4 for n in shape])
        for role in ("t1", "t1ce", "t2", "flair"):
            (root / name).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(root / name / f"{name}_{role}.nii.gz"))


def test_a_case_too_small_for_validation_is_named_before_training(tmp_path):
    """MS-SSIM in stage-1 validation needs every side >= 28: a 40x40x20 case at 1 mm (still 20 once padded to the
    tiny network's multiple of 4) used to fail after the first training epoch, naming no case."""
    _dataset(tmp_path / "data", {"BraTS-A": (40, 40, 40), "BraTS-B": (40, 40, 40), "BraTS-C": (40, 40, 40),
                                 "BraTS-Small": (40, 40, 20)})
    item = lambda name: {m: f"{name}/{name}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")}  # noqa: E731
    datalist = tmp_path / "datalist.json"  # the small case in validation, where MS-SSIM is computed
    datalist.write_text(json.dumps({"training": [item("BraTS-A"), item("BraTS-B")], "validation": [item("BraTS-Small")],
                                    "test": [item("BraTS-C")]}))
    out = tmp_path / "out"
    result = cli("prod9-train-autoencoder", "train", "--config", str(TINY), "--dataset-dir", str(tmp_path / "data"),
                 "--datalist", str(datalist), "--output-dir", str(out), "--spacing", "1", "1", "1",
                 "--limit-train-batches", "1", check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: case BraTS-Small: ") and "BraTS-Small_t1.nii.gz is (40, 40, 20) voxels" in line
    assert "validation (MS-SSIM) needs every side >= 28" in line
    assert not (out / "last.ckpt").exists()  # refused before any training step
