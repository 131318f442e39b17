"""Paths users really have: spaces, symbolic links, folders they may not write to. Good ones work; bad ones get a
one-line error naming them (exit status 2, no traceback) before any training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prod9_components.data import discover_cases
from tests.helpers import ROOT, TEST_SPACING, cli

TINY = {"prod9-train-autoencoder": ROOT / "bundles" / "maskgit_stage1" / "configs" / "tiny.json",
        "prod9-train-maisi-vae": ROOT / "bundles" / "maisi_stage1_vae" / "configs" / "tiny.json"}
# Root may write anywhere; without CAP_DAC_OVERRIDE it obeys file modes like any user.
AS_A_USER = [] if os.geteuid() != 0 else [shutil.which("setpriv") or "setpriv",
                                           "--bounding-set=-dac_override,-dac_read_search"]


def linked_dataset(real: str, root: Path) -> Path:
    """``root/my data``: a symbolic link to a folder of symbolic links, one per case of ``real``."""
    farm = root / "case links"
    farm.mkdir()
    for case in sorted(Path(real).iterdir()):
        if case.is_dir():
            (farm / case.name).symlink_to(case, target_is_directory=True)
    link = root / "my data"
    link.symlink_to(farm, target_is_directory=True)
    return link


def test_a_linked_dataset_is_the_real_one(demo_dataset_dir, tmp_path):
    linked = discover_cases(linked_dataset(demo_dataset_dir, tmp_path))
    assert linked == discover_cases(demo_dataset_dir)  # same cases, volumes resolved to the real files
    assert len(linked) >= 6


def test_training_from_a_linked_dataset_into_folders_with_spaces(demo_dataset_dir, tmp_path):
    out = tmp_path / "run output" / "stage 1"
    cli("prod9-train-autoencoder", "train", "--config", str(TINY["prod9-train-autoencoder"]), "--dataset-dir",
        str(linked_dataset(demo_dataset_dir, tmp_path)), "--output-dir", str(out), "--spacing", TEST_SPACING,
        "--roi-size", "16", "16", "16", "--limit-train-batches", "1", "--limit-val-batches", "1")
    assert (out / "best.ckpt").is_file() and (out / "autoencoder_tiny.pt").is_file()
    splits = json.loads((out / "datalist.json").read_text())
    cases = [case for split in splits.values() for case in split]
    assert len(cases) == len(discover_cases(demo_dataset_dir))  # no case skipped
    assert all(Path(case["t1"]).resolve().is_relative_to(Path(demo_dataset_dir).resolve()) for case in cases)


@pytest.mark.parametrize("broken", ["case", "volume"])
def test_a_broken_link_is_named_not_skipped(broken, demo_dataset_dir, tmp_path):
    dataset = linked_dataset(demo_dataset_dir, tmp_path)
    if broken == "case":
        (dataset / "BraTS-Gone").symlink_to(tmp_path / "moved away", target_is_directory=True)
        name = "BraTS-Gone"
    else:  # one volume of a real case folder replaced by a dangling link
        case = tmp_path / "copied case"
        shutil.copytree(next(p for p in sorted(Path(demo_dataset_dir).iterdir()) if p.is_dir()), case)
        volume = next(case.glob("*t1.nii.gz"))
        volume.unlink()
        volume.symlink_to(tmp_path / "moved away.nii.gz")
        (dataset / "BraTS-Copied").symlink_to(case, target_is_directory=True)
        name = f"BraTS-Copied/{volume.name}"
    out = tmp_path / "out"
    result = cli("prod9-train-autoencoder", "train", "--dataset-dir", str(dataset), "--output-dir", str(out),
                 check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {dataset}: broken symbolic link(s): {name}"
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs util-linux setpriv as root")
@pytest.mark.parametrize("command", list(TINY))
def test_a_read_only_output_folder_is_named_before_training(command, demo_dataset_dir, tmp_path):
    read_only = tmp_path / "read only"
    read_only.mkdir()
    read_only.chmod(0o555)
    out = read_only / "run"
    exe = str(Path(sys.executable).parent / command)
    result = subprocess.run([*AS_A_USER, exe, "train", "--config", str(TINY[command]), "--dataset-dir",
                             demo_dataset_dir, "--output-dir", str(out), "--spacing", TEST_SPACING],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot write datalist.json into {out}: Permission denied"
    assert "Traceback" not in result.stderr and "train:" not in result.stderr  # stopped before any training step
    assert list(read_only.iterdir()) == []
