"""The README's tiny chain, verbatim: every stage is ``python -m monai.bundle run`` on ``[train.json, tiny.json]``
from one working directory, and finds the stage before it by the bundles' default paths alone: no
``--autoencoder_path``, ``--vae_path``, ``--spacing`` or ``--network_def#max_grid_size`` (tiny stage 1 resamples to
4 mm, which the later stages read from the export, so the token grids fit the tiny transformer's position tables).

Only the data's location and the length of each run are given (``--limit_*``, ``--segmenter_steps``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import FEW_SAMPLES, ROOT, run_module

pytestmark = pytest.mark.slow

SHORT = {"limit_train_batches": 1, "limit_val_batches": 1}  # the chain, not the learning, is under test


def _run(cwd: Path, bundle: str, dataset_dir: str, check: bool = True, **ids) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of the bundle's [train.json, tiny.json] in ``cwd`` (in this process: the same
    module and argv; the stage-1 exports of test_zoo_export.py run in new processes)."""
    configs = ROOT / "bundles" / bundle / "configs"
    args = ["run", "--config_file", f"['{configs / 'train.json'}','{configs / 'tiny.json'}']", "--logging_file",
            str(configs / "logging.conf"), "--dataset_dir", dataset_dir]
    for key, value in {**SHORT, **ids}.items():
        args += [f"--{key}", str(value)]
    result = run_module("monai.bundle", args, cwd=cwd)
    assert result.returncode == 0 or not check, f"{bundle} failed:\n{result.stderr[-4000:]}"
    return result


def _record(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def test_maskgit_tiny_chain_needs_no_link_flags(demo_dataset_dir, tmp_path):
    _run(tmp_path, "maskgit_stage1", demo_dataset_dir)
    # A transformer too small for the tokens fails before training, in one line (not MONAI's page of
    # "Failed to evaluate ConfigExpression" traceback), naming the grid and the id to raise.
    small = _run(tmp_path, "maskgit_stage2_label", demo_dataset_dir, check=False,
                 **{"network_def#max_grid_size": "[4,4,4]", "output_dir": tmp_path / "small"})
    assert small.returncode == 1 and "Traceback" not in small.stderr, small.stderr[-3000:]
    last = small.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "exceeds the transformer's max_grid_size (4, 4, 4); raise " \
        "network_def#max_grid_size (PROD9_TRACEBACK=1 shows the traceback)" in last, last
    _run(tmp_path, "maskgit_stage2_label", demo_dataset_dir, **FEW_SAMPLES)
    _run(tmp_path, "maskgit_stage2_incontext", demo_dataset_dir)
    _run(tmp_path, "maskgit_stage3_controlnet", demo_dataset_dir, segmenter_steps=2)

    out = tmp_path / "outputs"
    export = out / "maskgit_stage1" / "autoencoder_tiny.pt"
    assert _record(export)["preprocessing"]["spacing"] == [4.0, 4.0, 4.0]
    for stage in ("maskgit_stage2_label", "maskgit_stage2_incontext"):
        record = _record(out / stage / "best.ckpt")
        assert record["autoencoder_path"] == str(export.resolve())
        assert all(g <= m for g, m in zip(record["volume_grid"], record["network_args"]["max_grid_size"])), record
    assert _record(out / "maskgit_stage3" / "best.ckpt")["transformer_path"] == str(
        (out / "maskgit_stage2_label" / "best.ckpt").resolve())


def test_maisi_tiny_chain_needs_no_link_flags(demo_dataset_dir, tmp_path):
    _run(tmp_path, "maisi_stage1_vae", demo_dataset_dir)
    _run(tmp_path, "maisi_stage2_diffusion", demo_dataset_dir, epochs=1, training_reference_cases=1)
    _run(tmp_path, "maisi_stage3_controlnet", demo_dataset_dir, epochs=1, segmenter_steps=2)

    out = tmp_path / "outputs"
    export = out / "maisi_stage1" / "vae_tiny.pt"
    assert _record(export)["preprocessing"]["spacing"] == [4.0, 4.0, 4.0]
    assert _record(out / "maisi_stage2" / "best.ckpt")["vae_path"] == str(export.resolve())
    assert _record(out / "maisi_stage3" / "best.ckpt")["diffusion_path"] == str(
        (out / "maisi_stage2" / "best.ckpt").resolve())
