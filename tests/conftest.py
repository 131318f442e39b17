"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prod9_components.data.demo import make_demo_dataset
from tests.helpers import (DIFFUSION, FEW_SAMPLES, INCONTEXT, LABEL, MAISI_CONTROLNET, STAGE1, TEST_SPACING, VAE,
                           bundle_run)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each (also for the bundle runs they start), or they fight for the cores.
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

DEMO_TEST_CASES = 6
DEMO_TEST_SHAPE = (48, 48, 32)  # 240x240x155 mm at 5 x 5 x 4.84 mm
DEMO_TEST_SEED = 0


def chain_group(nodeid: str) -> str | None:
    """The trained chain (session fixtures) a test uses: "maisi" or "maskgit", a module whose tests share trained
    module fixtures (its file name), else None."""
    path, _, name = nodeid.partition("::")
    if Path(path).name in SHARED_FIXTURE_FILES:
        return Path(path).name
    if Path(path).name in MAISI_CHAIN_FILES or name.startswith("test_maisi"):
        return "maisi"
    if Path(path).name in MASKGIT_CHAIN_FILES or name.startswith("test_maskgit"):
        return "maskgit"
    return None


MAISI_CHAIN_FILES = {"test_maisi_stage1.py", "test_maisi_stage2.py", "test_maisi_stage3.py", "test_maisi_vae_cli.py"}
SHARED_FIXTURE_FILES = {"test_known_answers.py"}
MASKGIT_CHAIN_FILES = {"test_maskgit_stage1.py", "test_maskgit_stage2.py", "test_maskgit_stage3.py",
                       "test_autoencoder_cli.py", "test_transformer_cli.py", "test_repo_template_runs.py"}


def pytest_xdist_make_scheduler(config, log):
    """`pytest -n 2`: every test of one chain runs on one worker, so each chain is trained once (xdist's
    ``loadgroup`` markers do not reach its scheduler under pytest 9); other tests are shared out one by one."""
    from xdist.scheduler import LoadScopeScheduling

    class ChainScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return chain_group(nodeid) or nodeid

    return ChainScheduling(config, log)


@pytest.fixture(scope="session")
def demo_dataset_dir(tmp_path_factory) -> str:
    """A small demo dataset (6 cases, 48x48x32 voxels, seed 0) in the BraTS 2021 layout; returns its dir."""
    root = tmp_path_factory.mktemp("demo_dataset")
    make_demo_dataset(root, num_cases=DEMO_TEST_CASES, seed=DEMO_TEST_SEED, shape=DEMO_TEST_SHAPE)
    return str(root)


@pytest.fixture(scope="session")
def stage1_run(demo_dataset_dir, tmp_path_factory) -> dict:
    """A tiny maskgit_stage1 bundle trained for 2 epochs by `python -m monai.bundle run` (shared by the bundle and
    CLI tests): returns dataset_dir, output_dir and export_path."""
    out = tmp_path_factory.mktemp("maskgit_stage1")
    bundle_run(STAGE1, ["train.json", "tiny.json"], {"dataset_dir": demo_dataset_dir, "output_dir": out,
                                                     "spacing": TEST_SPACING, "epochs": 2})
    return {"dataset_dir": demo_dataset_dir, "output_dir": str(out), "export_path": str(out / "autoencoder_tiny.pt")}


@pytest.fixture(scope="session")
def stage2_runs(stage1_run, tmp_path_factory) -> dict:
    """Both tiny stage-2 bundles trained for 1 epoch on the stage-1 export of ``stage1_run`` (shared token cache)."""
    root = tmp_path_factory.mktemp("maskgit_stage2")
    runs = {"dataset_dir": stage1_run["dataset_dir"], "autoencoder_path": stage1_run["export_path"],
            "token_cache_dir": str(root / "token_cache")}
    for name, configs, validation in (("label", LABEL, FEW_SAMPLES), ("incontext", INCONTEXT, {})):
        out = root / name
        bundle_run(configs, ["train.json", "tiny.json"], {
            "dataset_dir": runs["dataset_dir"], "output_dir": out, "autoencoder_path": runs["autoencoder_path"],
            "token_cache_dir": runs["token_cache_dir"], **validation})
        runs[name] = str(out)
    return runs


@pytest.fixture(scope="session")
def maisi_vae_run(demo_dataset_dir, tmp_path_factory) -> dict:
    """A tiny maisi_stage1_vae bundle trained for 2 epochs by `python -m monai.bundle run` (shared by the VAE,
    diffusion and CLI tests): returns dataset_dir, output_dir and export_path."""
    out = tmp_path_factory.mktemp("maisi_stage1")
    bundle_run(VAE, ["train.json", "tiny.json"], {"dataset_dir": demo_dataset_dir, "output_dir": out,
                                                  "spacing": TEST_SPACING, "epochs": 2})
    return {"dataset_dir": demo_dataset_dir, "output_dir": str(out), "export_path": str(out / "vae_tiny.pt")}


@pytest.fixture(scope="session")
def maisi_diffusion_run(maisi_vae_run, tmp_path_factory) -> dict:
    """A tiny maisi_stage2_diffusion bundle trained for 4 epochs x 4 steps on the export of ``maisi_vae_run``: returns
    dataset_dir, vae_path, latent_cache_dir and output_dir."""
    root = tmp_path_factory.mktemp("maisi_stage2")
    run = {"dataset_dir": maisi_vae_run["dataset_dir"], "vae_path": maisi_vae_run["export_path"],
           "latent_cache_dir": str(root / "latent_cache"), "output_dir": str(root / "trained")}
    bundle_run(DIFFUSION, ["train.json", "tiny.json"], {**run, "epochs": 4, "val_interval": 2, **FEW_SAMPLES})
    return run


@pytest.fixture(scope="session")
def maisi_controlnet_run(maisi_diffusion_run, tmp_path_factory) -> dict:
    """A tiny maisi_stage3_controlnet bundle (mask + T1 source image -> other modalities, contrastive loss on)
    trained for 2 epochs on the diffusion model of ``maisi_diffusion_run``: returns its ids plus diffusion_path."""
    run = {"dataset_dir": maisi_diffusion_run["dataset_dir"], "latent_cache_dir": maisi_diffusion_run["latent_cache_dir"],
           "output_dir": str(tmp_path_factory.mktemp("maisi_stage3")),
           "diffusion_path": str(Path(maisi_diffusion_run["output_dir"]) / "best.ckpt")}
    bundle_run(MAISI_CONTROLNET, ["train.json", "tiny.json"], {**run, "condition_type": "mask+image+label",
                                                               "source_modality": "T1", "contrastive_weight": 0.1})
    return run
