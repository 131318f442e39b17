"""A training process killed with SIGKILL at an arbitrary moment resumes from last.ckpt and ends bit for bit where the
uninterrupted run with the same seed ends (CPU; on CUDA nondeterministic kernels allow small differences). A resume
continues only its own run: other data is refused before anything is overwritten, a finished run says it trained
nothing, and a new learning rate takes effect."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from prod9_components.engines.lr_schedule import lr_schedule
from tests.helpers import ROOT, STAGE1, TEST_SPACING, bundle_run, cli, config_list, subprocess_env

pytestmark = pytest.mark.slow


def test_killed_run_resumes_to_the_uninterrupted_result(demo_dataset_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "monai.bundle", "run",
            "--config_file", config_list(STAGE1, "train.json", "tiny.json"),
            "--dataset_dir", demo_dataset_dir, "--output_dir", str(out), "--spacing", TEST_SPACING,
            "--epochs", "30", "--limit_train_batches", "2", "--val_interval", "100"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=subprocess_env())
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

    result = bundle_run(STAGE1, ["train.json", "tiny.json"], {"dataset_dir": demo_dataset_dir, "output_dir": out,
                                                              "spacing": TEST_SPACING, "epochs": killed_epoch + 2,
                                                              "limit_train_batches": 2, "val_interval": 100})
    assert f"resumed from {out / 'last.ckpt'} at epoch {killed_epoch}" in result.stdout + result.stderr
    final = torch.load(out / "last.ckpt", weights_only=True)
    assert final["epoch"] == killed_epoch + 2
    assert final["trainer"]["iteration"] == (killed_epoch + 2) * 2
    # EpochSeed reseeds every epoch from the run's seed: the resumed run ends exactly where an uninterrupted one does
    straight = tmp_path / "straight"
    bundle_run(STAGE1, ["train.json", "tiny.json"], {"dataset_dir": demo_dataset_dir, "output_dir": straight,
                                                     "spacing": TEST_SPACING, "epochs": killed_epoch + 2,
                                                     "limit_train_batches": 2, "val_interval": 100})
    reference = torch.load(straight / "last.ckpt", weights_only=True)
    for name in ("network", "discriminator"):
        assert reference[name].keys() == final[name].keys()
        assert all(torch.equal(reference[name][k], final[name][k]) for k in reference[name]), name


# One epoch of two iterations, warm-up then cosine: the run the tests below resume.
SHORT_RUN = {"spacing": TEST_SPACING, "epochs": 1, "limit_train_batches": 2, "val_interval": 100,
             "lr_schedule": "cosine", "warmup_steps": 1}


@pytest.fixture(scope="module")
def finished_run(demo_dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    bundle_run(STAGE1, ["train.json", "tiny.json"], {"dataset_dir": demo_dataset_dir, "output_dir": out, **SHORT_RUN})
    return {"dataset_dir": demo_dataset_dir, "output_dir": out}


def train_cli(out, *args):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SHORT_RUN.items()]
    return cli("prod9-train-autoencoder", "train", "--config", str(STAGE1 / "tiny.json"), "--output-dir", str(out),
               *flags, *args, check=False)


def snapshot(folder):
    """Bytes and modification time of the files a resume must not rewrite."""
    return {name: ((folder / name).read_bytes(), (folder / name).stat().st_mtime_ns)
            for name in ("last.ckpt", "datalist.json")}


def test_resuming_a_finished_run_says_nothing_was_trained(finished_run):
    out = finished_run["output_dir"]
    before = snapshot(out)
    result = train_cli(out, "--dataset-dir", finished_run["dataset_dir"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == (
        f"already at epoch 1 in {out / 'last.ckpt'}, nothing trained (--epochs 1; raise it to train on, or "
        "--resume false to start over)")
    assert "trained maskgit_stage1" not in result.stdout
    assert snapshot(out) == before  # nothing rewritten, not even the identical split


def test_the_closing_line_names_the_checkpoints_the_run_wrote(finished_run, tmp_path):
    """best.ckpt is written by a validation: a run that validated nothing says so instead of naming a missing file."""
    out = tmp_path / "run"
    shutil.copytree(finished_run["output_dir"], out)
    lines = {}
    for epochs, val_interval in ((2, 100), (3, 1)):
        result = train_cli(out, "--dataset-dir", finished_run["dataset_dir"], "--epochs", str(epochs),
                           "--val-interval", str(val_interval))
        assert result.returncode == 0, result.stderr[-2000:]
        lines[epochs] = result.stdout.strip().splitlines()[-1]
    start, logs = f"trained maskgit_stage1: checkpoints in {out}/ (", f"), TensorBoard logs in {out}/logs, export "
    assert lines[2].startswith(start + "last.ckpt; no best.ckpt: no validation ran, it runs every --val-interval "
                                       "epochs" + logs)
    assert lines[3].startswith(start + "best.ckpt, last.ckpt" + logs) and (out / "best.ckpt").is_file()


def test_resuming_on_other_data_is_refused_before_anything_is_overwritten(finished_run, tmp_path):
    out = tmp_path / "run"  # a copy: the run the other tests resume stays as it was, whatever happens here
    shutil.copytree(finished_run["output_dir"], out)
    before = snapshot(out)
    saved = json.loads((out / "datalist.json").read_text())
    other = tmp_path / "five_cases.json"  # the same dataset less one case: another split
    other.write_text(json.dumps({"training": [item for split in saved.values() for item in split][:5]}))
    result = train_cli(out, "--epochs", "2", "--dataset-dir", finished_run["dataset_dir"], "--datalist", str(other))
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: {out / 'last.ckpt'}: it was trained on the data split in {out / 'datalist.json'}")
    assert line.endswith("pass --resume false to start a new run there, or choose a new --output-dir")
    assert snapshot(out) == before


def test_a_changed_learning_rate_applies_on_resume(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run["output_dir"], out)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({
        "lr_probe": {"_target_": "tests.dist_probe.LearningRates", "output_dir": "@output_dir",
                     "optimizer": "@optimizer"},
        "run": ["$@lr_probe.attach(@train#trainer)", "$@train#trainer.run()"]}))
    bundle_run(STAGE1, ["train.json", "tiny.json", str(probe)], {
        "dataset_dir": finished_run["dataset_dir"], "output_dir": out, **SHORT_RUN, "epochs": 2,
        "learning_rate": 0.002})
    lrs = {int(k): v for k, v in json.loads((out / "learning_rates.json").read_text()).items()}
    assert sorted(lrs) == [3, 4]  # resumed after iteration 2
    # What the schedule gives a new run at 0.002 after 3 iterations of 4 (tiny.json trained the first epoch at 0.0005).
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    schedule = lr_schedule(optimizer, "cosine", total_steps=4, warmup_steps=1)
    for _ in range(3):
        optimizer.step()
        schedule.step()
    assert lrs[3] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
    assert lrs[3] == pytest.approx(0.002 * 0.25, rel=1e-12)  # half a cosine, 2 of 3 decay steps done
