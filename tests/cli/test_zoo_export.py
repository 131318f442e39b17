"""`export` writes a trained stage 1 (one per family) as a model-zoo bundle folder that runs on its own: the
standalone inference.json reconstructs with models/model.pt exactly as the command's `infer` does with the
checkpoint, MONAI's metadata, shape and TorchScript checks pass, and nothing is replaced."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

from tests.helpers import ROOT, cli, subprocess_env

pytestmark = pytest.mark.slow


def test_maskgit_stage1_export_runs_alone(stage1_run, tmp_path):
    exported_stage1_runs_alone(stage1_run, "prod9-train-autoencoder", tmp_path)


def test_maisi_vae_export_runs_alone(maisi_vae_run, tmp_path):
    exported_stage1_runs_alone(maisi_vae_run, "prod9-train-maisi-vae", tmp_path)


def exported_stage1_runs_alone(run: dict, command: str, tmp_path: Path) -> None:
    """(Each family's test is named after it: tests/conftest.py runs it on the worker that trained the family.)"""
    checkpoint, bundle = f"{run['output_dir']}/best.ckpt", tmp_path / "zoo_bundle"
    result = cli(command, "export", "--checkpoint", checkpoint, "--output-dir", str(bundle))
    assert f"model-zoo bundle written to {bundle}/" in result.stdout
    for name in ("configs/inference.json", "configs/metadata.json", "configs/logging.conf", "models/model.pt",
                 "large_files.yml", "docs/README.md", "docs/data_license.txt", "LICENSE"):
        assert (bundle / name).is_file(), name
    for config in (bundle / "configs").glob("*.json"):  # the zoo's JSON format
        assert config.read_text() == json.dumps(json.loads(config.read_text()), indent=4) + "\n"
    sha = hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
    assert f'hash_val: "{sha}"' in (bundle / "large_files.yml").read_text()
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert "exported by prod9_components from best.ckpt" in metadata["changelog"][metadata["version"]]
    card = (bundle / "docs" / "README.md").read_text()
    assert all(f"## {s}" in card for s in ("Data", "Performance", "System Configuration", "Authors", "Tags"))

    # Run alone, in the folder, on one volume; the same reconstruction as `infer` with the same window.
    image = sorted(Path(run["dataset_dir"]).rglob("*_t2.nii.gz"))[0]
    alone = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                            "--datalist", f"['{image}']"], cwd=bundle, env=subprocess_env(), capture_output=True,
                           text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    written = bundle / "eval" / image.name.replace(".nii.gz", "_recon.nii.gz")
    inferer = json.loads((bundle / "configs" / "inference.json").read_text())["inferer"]
    reference = tmp_path / "reference.nii.gz"
    cli(command, "infer", "--checkpoint", checkpoint, "--input", str(image), "--output", str(reference),
        "--roi-size", *map(str, inferer["roi_size"]), "--overlap", str(inferer["overlap"]),
        "--output-dir", str(tmp_path / "run"))
    ours, theirs = nib.load(written), nib.load(reference)
    assert ours.shape == theirs.shape == nib.load(image).shape
    np.testing.assert_allclose(ours.get_fdata(), theirs.get_fdata(), atol=1e-4)

    # MONAI's own checks on the folder.
    meta, config = str(bundle / "configs" / "metadata.json"), str(bundle / "configs" / "inference.json")
    verify_metadata(meta_file=meta, filepath=str(ROOT / "schemas" / "meta_schema_20240725.json"))
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu", n=4)
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"),
                ckpt_file=str(bundle / "models" / "model.pt"), meta_file=meta, config_file=config, use_trace=True,
                input_shape=[1, 1, 32, 32, 32])
    assert (tmp_path / "model.ts").stat().st_size > 0

    # A second export into the folder is refused, and changes nothing.
    before = {p: p.stat().st_mtime_ns for p in bundle.rglob("*")}
    again = cli(command, "export", "--checkpoint", checkpoint, "--output-dir", str(bundle), check=False)
    assert again.returncode != 0 and "exists and is not empty" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in bundle.rglob("*")} == before
