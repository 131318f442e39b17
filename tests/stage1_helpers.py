"""Shared helpers for tests that run the maskgit_stage1 bundle for real (tiny network, small demo data)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "maskgit_stage1"
CONFIGS = BUNDLE / "configs"
# Tiny demo volumes are 5 mm; resampling to 4 mm keeps them small (about 35x43x35 voxels of brain).
TEST_SPACING = "[4.0,4.0,4.0]"


def config_list(*names: str) -> str:
    """A MONAI config-file list; bare names are files of the stage-1 bundle, absolute paths are kept."""
    return "[" + ",".join(f"'{CONFIGS / n}'" for n in names) + "]"


def bundle_run(config_names: list[str], overrides: dict[str, str], timeout: int = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run`` exactly as a user would, in a subprocess."""
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_list(*config_names),
            "--logging_file", str(CONFIGS / "logging.conf")]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and result.returncode != 0:
        raise AssertionError(f"bundle run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def cli(command: str, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a console script (``prod9-train-autoencoder ...``) from the test venv."""
    exe = Path(sys.executable).parent / command
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and result.returncode != 0:
        raise AssertionError(f"{command} {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result
