"""A training process killed with SIGKILL at an arbitrary moment resumes from last.ckpt and ends bit for bit where the
uninterrupted run with the same seed ends (CPU; on CUDA nondeterministic kernels allow small differences)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.stage1_helpers import ROOT, TEST_SPACING, bundle_run, config_list

pytestmark = pytest.mark.slow


def test_killed_run_resumes_to_the_uninterrupted_result(demo_dataset_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_list("train.json", "tiny.json"),
            "--dataset_dir", demo_dataset_dir, "--output_dir", str(out), "--spacing", TEST_SPACING,
            "--epochs", "30", "--limit_train_batches", "2", "--val_interval", "100"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "last.ckpt").exists():
            time.sleep(0.2)
        assert (out / "last.ckpt").exists(), "no last.ckpt within 300 s"
        time.sleep(1.0)  # let it get into a later epoch, then kill it hard at an arbitrary point
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    killed_epoch = torch.load(out / "last.ckpt", weights_only=True)["epoch"]
    assert 1 <= killed_epoch < 30

    result = bundle_run(["train.json", "tiny.json"], {"dataset_dir": demo_dataset_dir, "output_dir": out,
                                                      "spacing": TEST_SPACING, "epochs": killed_epoch + 2,
                                                      "limit_train_batches": 2, "val_interval": 100})
    assert f"resumed from {out / 'last.ckpt'} at epoch {killed_epoch}" in result.stdout + result.stderr
    final = torch.load(out / "last.ckpt", weights_only=True)
    assert final["epoch"] == killed_epoch + 2
    assert final["trainer"]["iteration"] == (killed_epoch + 2) * 2
    # EpochSeed reseeds every epoch from the run's seed: the resumed run ends exactly where an uninterrupted one does
    straight = tmp_path / "straight"
    bundle_run(["train.json", "tiny.json"], {"dataset_dir": demo_dataset_dir, "output_dir": straight,
                                             "spacing": TEST_SPACING, "epochs": killed_epoch + 2,
                                             "limit_train_batches": 2, "val_interval": 100})
    reference = torch.load(straight / "last.ckpt", weights_only=True)
    for name in ("network", "discriminator"):
        assert reference[name].keys() == final[name].keys()
        assert all(torch.equal(reference[name][k], final[name][k]) for k in reference[name]), name
