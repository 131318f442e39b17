"""maisi_stage1_vae through `python -m monai.bundle run`: train -> evaluate -> infer, resume, bundle contract."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from prod9_components.networks.export import build_network, load_record
from prod9_components.networks.maisi_vae import MaisiVAE
from tests.helpers import TEST_SPACING, VAE, bundle_run

pytestmark = pytest.mark.slow

STAGE = "maisi_stage1_vae"


def test_training_writes_checkpoints_and_a_self_describing_export(maisi_vae_run):
    out = Path(maisi_vae_run["output_dir"])
    for name in ("best.ckpt", "last.ckpt", "datalist.json"):
        assert (out / name).is_file(), name
    assert list((out / "logs").glob("events.out.tfevents.*")), "no TensorBoard events"

    for path in (out / "best.ckpt", maisi_vae_run["export_path"]):
        record = load_record(path, stages=[STAGE])
        network = build_network(record, expected_args={"latent_channels": 4, "in_channels": 1}, source=str(path))
        assert isinstance(network, MaisiVAE) and network.downsample_factor == 4
        assert record["network_args"]["num_channels"] == [8, 16, 32]
        assert record["preprocessing"]["spacing"] == [4.0, 4.0, 4.0]
        assert record["sliding_window"] == {"roi_size": [32, 32, 32], "overlap": 0.25}
        assert math.isfinite(record["metrics"]["psnr"]) and record["epoch"] in (1, 2)
    last = torch.load(out / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["trainer"]["iteration"] == 2 * 4


def test_evaluate_writes_finite_image_metrics(maisi_vae_run, tmp_path):
    checkpoint = str(Path(maisi_vae_run["output_dir"]) / "best.ckpt")
    bundle_run(VAE, ["train.json", "evaluate.json", "tiny.json"], {
        "dataset_dir": maisi_vae_run["dataset_dir"], "output_dir": tmp_path, "checkpoint": checkpoint,
        "split": "test"})
    metrics = json.loads((tmp_path / "metrics_test.json").read_text())
    assert metrics["split"] == "test" and metrics["checkpoint"] == checkpoint
    assert metrics["num_cases"] == 1  # tiny.json: limit_val_batches 2 of the one test case's 4 volumes
    for key in ("psnr", "ssim", "ms_ssim"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert 5.0 < metrics["psnr"] < 60.0
    assert -1.0 <= metrics["ssim"] <= 1.0 and 0.0 <= metrics["ms_ssim"] <= 1.0
    assert "codebook_usage" not in metrics  # a VAE has no codes
    for score in ("psnr", "ssim", "ms_ssim"):  # beside the pool-by-4 baseline, on the same volumes
        assert math.isfinite(metrics[f"pool_baseline_{score}"])
        assert metrics[f"margin_{score}"] == pytest.approx(metrics[score] - metrics[f"pool_baseline_{score}"], abs=1e-6)
    assert metrics["beats_baselines"] in (0.0, 1.0)


def test_inference_reconstructs_a_volume_on_its_own_grid(maisi_vae_run, tmp_path):
    splits = json.loads((Path(maisi_vae_run["output_dir"]) / "datalist.json").read_text())
    source_path = splits["test"][0]["t2"]
    output = tmp_path / "t2_recon.nii.gz"
    bundle_run(VAE, ["train.json", "checkpoint_inference.json", "tiny.json"], {
        "dataset_dir": maisi_vae_run["dataset_dir"], "output_dir": tmp_path,
        "checkpoint": maisi_vae_run["export_path"], "input": source_path, "output": output})
    source, recon = nib.load(source_path), nib.load(output)
    assert recon.shape == source.shape
    np.testing.assert_allclose(recon.affine, source.affine, atol=1e-4)
    data = recon.get_fdata()
    assert np.isfinite(data).all()
    # Intensities are mapped back to the input's range (demo volumes: 0..~1000), not left in [0, 1].
    assert 100.0 < data.max() < 2.0 * source.get_fdata().max()


def test_training_resumes_from_last_checkpoint(maisi_vae_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(maisi_vae_run["output_dir"], out)
    result = bundle_run(VAE, ["train.json", "tiny.json"], {
        "dataset_dir": maisi_vae_run["dataset_dir"], "output_dir": out, "spacing": TEST_SPACING, "epochs": 3,
        "val_interval": 100, "cache_rate": 0.0})
    assert f"resumed from {out / 'last.ckpt'} at epoch 2" in result.stdout + result.stderr
    last = torch.load(out / "last.ckpt", weights_only=True)
    assert last["epoch"] == 3 and last["trainer"]["iteration"] == 3 * 4

