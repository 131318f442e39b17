"""maskgit_stage1 through `python -m monai.bundle run`: train -> evaluate -> infer, resume, learning."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import STAGE1, bundle_run

pytestmark = pytest.mark.slow


def test_train_evaluate_infer_chain(stage1_run):
    out = Path(stage1_run["output_dir"])
    for name in ("best.ckpt", "last.ckpt", "datalist.json"):
        assert (out / name).is_file(), name
    assert Path(stage1_run["export_path"]).is_file()
    assert list((out / "logs").glob("events.out.tfevents.*")), "no TensorBoard events"

    # best.ckpt and the export are self-describing and load with weights_only=True.
    record = torch.load(stage1_run["export_path"], weights_only=True)
    assert record["network_args"]["num_channels"] == [8, 16, 32]
    assert record["preprocessing"]["spacing"] == [4.0, 4.0, 4.0]
    last = torch.load(out / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["trainer"]["iteration"] == 2 * 4

    # evaluate.json writes one flat metrics_<split>.json.
    bundle_run(STAGE1, ["train.json", "evaluate.json"], {"dataset_dir": stage1_run["dataset_dir"], "output_dir": out,
                                                         "split": "test"})
    metrics = json.loads((out / "metrics_test.json").read_text())
    assert metrics["split"] == "test" and metrics["num_cases"] == 1  # 1 test case (its 4 modalities scored)
    for key in ("psnr", "ssim", "ms_ssim", "codebook_usage", "perplexity"):
        assert isinstance(metrics[key], float), key
    assert 5.0 < metrics["psnr"] < 60.0
    assert 0.0 < metrics["codebook_usage"] <= 1.0 and metrics["perplexity"] >= 1.0
    # The trivial baseline on the same volumes: average-pool by the downsampling (4), trilinear back.
    for score in ("psnr", "ssim", "ms_ssim"):
        best = metrics[f"pool_baseline_{score}"]
        assert metrics[f"best_baseline_{score}"] == best
        assert metrics[f"margin_{score}"] == pytest.approx(metrics[score] - best, abs=1e-6)
    assert 10.0 < metrics["pool_baseline_psnr"] < 40.0
    assert metrics["beats_baselines"] == float(all(metrics[f"margin_{s}"] > 0 for s in ("psnr", "ssim", "ms_ssim")))

    # checkpoint_inference.json (the `infer` verb's config) reconstructs the test split into NIfTI files with the
    # inputs' geometry.
    bundle_run(STAGE1, ["train.json", "checkpoint_inference.json"],
               {"dataset_dir": stage1_run["dataset_dir"], "output_dir": out})
    written = sorted((out / "reconstructions").glob("*_recon.nii.gz"))
    assert len(written) == 4
    splits = json.loads((out / "datalist.json").read_text())
    source = nib.load(splits["test"][0]["t1"])
    recon = nib.load(out / "reconstructions" / f"{splits['test'][0]['case']}_T1_recon.nii.gz")  # <case>_<MOD>
    assert recon.shape == source.shape
    np.testing.assert_allclose(recon.affine, source.affine, atol=1e-4)
