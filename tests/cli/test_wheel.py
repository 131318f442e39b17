"""The wheel is the product: built from the repository's tracked sources and installed on its own, it carries the
seven bundles, and its console script trains a tiny stage 1 from an empty folder (no repository, no ./bundles)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT, TEST_SPACING, subprocess_env

pytestmark = pytest.mark.slow

STAGES = ("maskgit_stage1", "maskgit_stage2_label", "maskgit_stage2_incontext", "maskgit_stage3_controlnet",
          "maisi_stage1_vae", "maisi_stage2_diffusion", "maisi_stage3_controlnet")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the tracked sources (building in the repository would leave build/ there)."""
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file() and not (ROOT / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(source), "-w", str(out)], check=True, env=subprocess_env())
    (built,) = out.glob("prod9_components-*.whl")
    return built


def test_the_wheel_carries_every_bundle(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for stage in STAGES:
        for part in ("configs/train.json", "configs/tiny.json", "configs/inference.json",
                     "configs/checkpoint_inference.json", "configs/metadata.json",
                     "configs/logging.conf", "docs/README.md", "LICENSE"):
            assert f"prod9_components/bundles/{stage}/{part}" in names, f"{stage}/{part} not in {wheel.name}"


def test_the_installed_wheel_trains_from_an_empty_folder(wheel, demo_dataset_dir, tmp_path):
    target, empty = tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, env=subprocess_env())
    # The installed copy, not the repository's editable one: PYTHONPATH comes first on sys.path.
    env = {**subprocess_env(), "PYTHONPATH": str(target)}
    script = target / "bin" / "prod9-train-autoencoder"
    result = subprocess.run(
        [sys.executable, str(script), "train", "--dataset-dir", demo_dataset_dir, "--output-dir", "run",
         "--config", str(target / "prod9_components" / "bundles" / "maskgit_stage1" / "configs" / "tiny.json"),
         "--spacing", *(str(v) for v in json.loads(TEST_SPACING)), "--epochs", "1"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (empty / "run" / "best.ckpt").is_file() and (empty / "run" / "autoencoder_tiny.pt").is_file()
    where = subprocess.run([sys.executable, "-c", "import prod9_components; print(prod9_components.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target)), where
