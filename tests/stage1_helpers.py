"""Shared helpers for tests that run the maskgit_stage1 bundle for real (tiny network, small demo data)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from importlib.metadata import entry_points
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


def cli(command: str, *args: str, check: bool = True, timeout: int = 600,
        in_process: bool = False) -> subprocess.CompletedProcess:
    """Run a console script (``prod9-train-autoencoder ...``) from the test venv.

    ``in_process``: call the script's entry point in this process instead (the same code without the seconds of
    interpreter and import start-up; for runs that stop early, such as bad input).
    """
    if in_process:
        return _cli_in_process(command, args)
    exe = Path(sys.executable).parent / command
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and result.returncode != 0:
        raise AssertionError(f"{command} {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def _cli_in_process(command: str, args) -> subprocess.CompletedProcess:
    (entry,) = entry_points(group="console_scripts", name=command)
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            entry.load()(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess([command, *args], code, stdout.getvalue(), stderr.getvalue())
