"""2-process gloo `torchrun` runs of stage 1 and stage 2 of both families: every bundle's multi_gpu_train.json
trains, the ranks see disjoint shards of the training data every epoch, and only rank 0 writes checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stage1_helpers import ROOT, TEST_SPACING

pytestmark = pytest.mark.slow

PROBE = {"probe": {"_target_": "tests.dist_probe.SeenItems", "output_dir": "@output_dir"},
         "run": ["$@probe.attach(@train#trainer)", "$@train#trainer.run()"]}


def torchrun(bundle: str, out: Path, overrides: dict) -> subprocess.CompletedProcess:
    configs = ROOT / "bundles" / bundle / "configs"
    out.mkdir(parents=True)
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


def check_ranks(out: Path, result: subprocess.CompletedProcess) -> None:
    seen = [json.loads((out / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0].keys() == seen[1].keys() == {"1", "2"}
    for epoch in ("1", "2"):
        first, second = set(seen[0][epoch]), set(seen[1][epoch])
        assert first and second and not first & second, (epoch, first & second)  # disjoint shards
    assert seen[0]["1"] != seen[0]["2"]  # a new shuffle every epoch (the sampler's epoch is set)
    text = result.stdout + result.stderr
    assert text.count("is the best so far; wrote") == 1  # one validation, one writer
    assert sorted(p.name for p in out.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("bundle", ["maskgit_stage1", "maisi_stage1_vae"])
def test_stage1_trains_on_two_gloo_processes(bundle, demo_dataset_dir, tmp_path):
    out = tmp_path / "run"
    result = torchrun(bundle, out, {"dataset_dir": demo_dataset_dir, "spacing": TEST_SPACING,
                                    "limit_train_batches": 2, "limit_val_batches": 1})
    check_ranks(out, result)


def test_maskgit_stage2_trains_on_two_gloo_processes(stage2_runs, tmp_path):
    out = tmp_path / "run"
    result = torchrun("maskgit_stage2_label", out, {  # the suite's token cache: no encoding on two ranks
        "dataset_dir": stage2_runs["dataset_dir"], "autoencoder_path": stage2_runs["autoencoder_path"],
        "token_cache_dir": stage2_runs["token_cache_dir"], "limit_train_batches": 2})
    check_ranks(out, result)


def test_maisi_stage2_trains_on_two_gloo_processes(maisi_diffusion_run, tmp_path):
    out = tmp_path / "run"
    result = torchrun("maisi_stage2_diffusion", out, {  # the suite's latent cache
        "dataset_dir": maisi_diffusion_run["dataset_dir"], "vae_path": maisi_diffusion_run["vae_path"],
        "latent_cache_dir": maisi_diffusion_run["latent_cache_dir"], "limit_train_batches": 2})
    check_ranks(out, result)
