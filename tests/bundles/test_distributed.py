"""2-process gloo `torchrun` runs of stage 1 and stage 2 of both families: every bundle's multi_gpu_train.json
trains, the ranks see disjoint shards of the training data every epoch, they validate disjoint shards of the
validation split and end with the same (reduced) metrics, and only rank 0 writes checkpoints; a torchrun run resumes
from its last.ckpt (MaskGiT stage 1: trained in two runs, one resuming the other)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import FEW_SAMPLES, ROOT, TEST_SPACING, cli

pytestmark = pytest.mark.slow

PROBE = {"probe": {"_target_": "tests.dist_probe.SeenItems", "output_dir": "@output_dir"},
         "run": ["$@probe.attach(@train#trainer)", "$@probe.attach(@validate#evaluator, 'validate')",
                 "$@train#trainer.run()"]}


def torchrun(bundle: str, out: Path, overrides: dict) -> subprocess.CompletedProcess:
    configs = ROOT / "bundles" / bundle / "configs"
    out.mkdir(parents=True, exist_ok=True)  # exists when a test resumes a run
    probe = out.parent / f"{bundle}_probe.json"
    probe.write_text(json.dumps(PROBE))
    files = [configs / "train.json", configs / "tiny.json", configs / "multi_gpu_train.json", probe]
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
            "run", "--config_file", "[" + ",".join(f"'{f}'" for f in files) + "]", "--output_dir", str(out),
            "--epochs", "2", "--val_interval", "2", "--num_workers", "0"]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def check_ranks(out: Path, result: subprocess.CompletedProcess, key_metric: str) -> dict:
    """Check what every test here checks; return the validation metrics (rank 0's)."""
    seen = [json.loads((out / f"seen_train_rank{r}.json").read_text())["items"] for r in (0, 1)]
    assert seen[0].keys() == seen[1].keys() == {"1", "2"}
    for epoch in ("1", "2"):
        first, second = set(seen[0][epoch]), set(seen[1][epoch])
        assert first and second and not first & second, (epoch, first & second)  # disjoint shards
    assert seen[0]["1"] != seen[0]["2"]  # a new shuffle every epoch (the sampler's epoch is set)
    text = result.stdout + result.stderr
    assert text.count("is the best so far; wrote") == 1  # one validation, one writer
    assert sorted(p.name for p in out.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    # Only rank 0 opens TensorBoard files (rank 1 used to leave empty ones: 88 bytes, the file header alone).
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and all(f.stat().st_size > 88 for f in events), [(f.name, f.stat().st_size) for f in events]

    validated = [json.loads((out / f"seen_validate_rank{r}.json").read_text()) for r in (0, 1)]
    shards = [set(v["items"]["2"]) for v in validated]  # validated once, after epoch 2
    if len(shards[0] | shards[1]) >= 2:
        assert shards[0] and shards[1] and not shards[0] & shards[1]  # each rank validates its own share
    else:  # fewer items than ranks: every rank validates everything (an empty rank would hang the gather)
        assert shards[0] == shards[1]
    metrics = [v["metrics"] for v in validated]
    assert key_metric in metrics[1]
    for name in metrics[1]:  # reduced across ranks: the same numbers on both, though each saw other items
        assert metrics[0][name] == pytest.approx(metrics[1][name], rel=1e-6, abs=1e-9), name
    return metrics[0]


def assert_one_process_validates_alike(bundle: str, out: Path, metrics: dict, dataset_dir: str, tmp_path: Path):
    """The sharded, reduced validation of the final weights equals one process validating the whole split."""
    command = {"maskgit_stage1": "prod9-train-autoencoder", "maisi_stage1_vae": "prod9-train-maisi-vae"}[bundle]
    tiny = ROOT / "bundles" / bundle / "configs" / "tiny.json"
    cli(command, "validate", "--config", str(tiny), "--checkpoint", str(out / "best.ckpt"), "--output-dir",
        str(tmp_path / "single"), "--dataset-dir", dataset_dir, "--spacing", TEST_SPACING)
    single = json.loads((tmp_path / "single" / "metrics_validation.json").read_text())
    for name in ("psnr", "ssim"):
        assert single[name] == pytest.approx(metrics[name], rel=1e-5), name


def test_maisi_stage1_trains_on_two_gloo_processes(demo_dataset_dir, tmp_path):
    out = tmp_path / "run"
    result = torchrun("maisi_stage1_vae", out, {"dataset_dir": demo_dataset_dir, "spacing": TEST_SPACING,
                                                "limit_train_batches": 2, "limit_val_batches": 2})
    metrics = check_ranks(out, result, "psnr")
    assert_one_process_validates_alike("maisi_stage1_vae", out, metrics, demo_dataset_dir, tmp_path)


def test_maskgit_stage1_trains_and_resumes_on_two_gloo_processes(demo_dataset_dir, tmp_path):
    """A DDP run stopped after epoch 1 (a short max_epochs) continues to epoch 2 from its last.ckpt; the two runs
    together pass every check of a 2-epoch run."""
    out = tmp_path / "run"
    settings = {"dataset_dir": demo_dataset_dir, "spacing": TEST_SPACING, "limit_train_batches": 2,
                "limit_val_batches": 2}
    torchrun("maskgit_stage1", out, {**settings, "epochs": 1})
    first = torch.load(out / "last.ckpt", weights_only=True)
    assert first["epoch"] == 1 and not (out / "best.ckpt").exists()  # validation comes at epoch 2
    assert not [key for key in first["network"] if key.startswith("module.")]  # the bare network's keys
    result = torchrun("maskgit_stage1", out, {**settings, "epochs": 2})
    text = result.stdout + result.stderr
    assert text.count(f"resumed from {out / 'last.ckpt'} at epoch 1 (iteration 2); training to epoch 2") == 2  # ranks
    final = torch.load(out / "last.ckpt", weights_only=True)
    assert (final["epoch"], final["trainer"]["iteration"]) == (2, 4)
    assert (out / "best.ckpt").is_file() and final["best_epoch"] == 2
    metrics = check_ranks(out, result, "psnr")
    assert_one_process_validates_alike("maskgit_stage1", out, metrics, demo_dataset_dir, tmp_path)


def test_maskgit_stage2_trains_on_two_gloo_processes(stage2_runs, tmp_path):
    out = tmp_path / "run"
    result = torchrun("maskgit_stage2_label", out, {  # the suite's token cache: no encoding on two ranks
        "dataset_dir": stage2_runs["dataset_dir"], "autoencoder_path": stage2_runs["autoencoder_path"],
        "token_cache_dir": stage2_runs["token_cache_dir"], "limit_train_batches": 2, **FEW_SAMPLES})
    check_ranks(out, result, "val_loss")


def test_maisi_stage2_trains_on_two_gloo_processes(maisi_diffusion_run, tmp_path):
    out = tmp_path / "run"
    result = torchrun("maisi_stage2_diffusion", out, {  # the suite's latent cache
        "dataset_dir": maisi_diffusion_run["dataset_dir"], "vae_path": maisi_diffusion_run["vae_path"],
        "latent_cache_dir": maisi_diffusion_run["latent_cache_dir"], "limit_train_batches": 2, **FEW_SAMPLES})
    check_ranks(out, result, "val_loss")
