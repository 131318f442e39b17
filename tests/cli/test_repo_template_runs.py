"""The repository's stage-1 ``configs/inference.json`` is the config an export writes, up to the values a training
run determines: in a copy of the repository's bundle folder, with an export's ``models/model.pt`` copied in and those
values given as ``--id value`` overrides, ``python -m monai.bundle run`` writes the exported folder's very
reconstruction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import ROOT, cli, run_module

pytestmark = pytest.mark.slow

# What only the trained run decides in a stage-1 config: its network's sizes, the spacing and intensity range it was
# trained at, and its sliding window.
RUN_DETERMINED = ("autoencoder_def#", "spacing", "intensity_range", "inferer#roi_size")


def flat(config: dict, prefix: str = "") -> dict:
    """``{"a#b": leaf}`` for every dict leaf (a list is one leaf: a bundle override replaces it whole)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}#"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_bundle(folder: Path, image: Path, overrides: dict) -> Path:
    """``monai.bundle run`` of ``configs/inference.json`` in ``folder`` on ``image``; the reconstruction it wrote."""
    args = [a for key, value in overrides.items() for a in (f"--{key}", repr(value))]  # fire reads Python literals
    result = run_module("monai.bundle", ["run", "--config_file", "configs/inference.json", "--datalist", f"['{image}']",
                                         *args], cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "eval" / image.name.replace(".nii.gz", "_recon.nii.gz")


def test_the_repository_stage1_template_runs_an_exported_model(stage1_run, tmp_path):
    exported = tmp_path / "exported"
    cli("prod9-train-autoencoder", "export", "--checkpoint", f"{stage1_run['output_dir']}/best.ckpt",
        "--output-dir", str(exported))
    theirs = flat(json.loads((exported / "configs" / "inference.json").read_text()))
    ours = flat(json.loads((ROOT / "bundles" / "maskgit_stage1" / "configs" / "inference.json").read_text()))
    assert set(ours) == set(theirs)
    overrides = {key: theirs[key] for key in ours if ours[key] != theirs[key]}
    assert overrides and all(key.startswith(RUN_DETERMINED) for key in overrides), sorted(overrides)

    repository = tmp_path / "maskgit_stage1"  # a copy: the repository's folder is never written
    shutil.copytree(ROOT / "bundles" / "maskgit_stage1", repository)
    shutil.copyfile(exported / "models" / "model.pt", repository / "models" / "model.pt")
    image = sorted(Path(stage1_run["dataset_dir"]).rglob("*_t2.nii.gz"))[0]
    written, reference = run_bundle(repository, image, overrides), run_bundle(exported, image, {})
    assert nib.load(written).shape == nib.load(image).shape
    np.testing.assert_array_equal(nib.load(written).get_fdata(), nib.load(reference).get_fdata())
