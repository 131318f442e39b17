"""What tests use to run the bundles and console scripts for real (tiny networks on the small demo data): each
bundle's config folder, ``python -m monai.bundle run`` and the ``prod9-train-*`` scripts, as a user runs them."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def script_module(name: str):
    """``scripts/<name>.py`` as a module (scripts/ is not a package), loaded once and registered first, as
    dataclasses need."""
    import importlib.util

    key = f"prod9_script_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / f"{name}.py")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def configs_dir(bundle: str) -> Path:
    """``bundles/<bundle>/configs``."""
    return ROOT / "bundles" / bundle / "configs"


STAGE1 = configs_dir("maskgit_stage1")
LABEL = configs_dir("maskgit_stage2_label")
INCONTEXT = configs_dir("maskgit_stage2_incontext")
MASKGIT_CONTROLNET = configs_dir("maskgit_stage3_controlnet")
VAE = configs_dir("maisi_stage1_vae")
DIFFUSION = configs_dir("maisi_stage2_diffusion")
MAISI_CONTROLNET = configs_dir("maisi_stage3_controlnet")

# Tiny demo volumes are 5 mm; resampling to 4 mm keeps them small (about 35x43x35 voxels of brain).
TEST_SPACING = "[4.0,4.0,4.0]"


def subprocess_env() -> dict:
    """The environment of every process a test starts: read when the process starts, so the conftest's one-thread
    setting under xdist (set after this module is imported) reaches every run alike. Warnings of the libraries would
    bury the error a failed run's assertion shows."""
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def config_list(configs: Path, *names: str) -> str:
    """A MONAI config-file list: ``names`` inside ``configs`` (an absolute path is kept as it is)."""
    return "[" + ",".join(f"'{configs / n}'" for n in names) + "]"


def bundle_run(configs: Path, names: list[str], overrides: dict, timeout: int = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` in a subprocess, exactly as a user runs it.

    Args:
        configs: the bundle's config folder (:data:`STAGE1`, :data:`VAE`, ...); its logging.conf is used.
        names: config files layered in this order (``["train.json", "tiny.json"]``).
        overrides: ``--id value`` pairs.
        check: raise with the run's output tail when it fails.
    """
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_list(configs, *names),
            "--logging_file", str(configs / "logging.conf")]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=subprocess_env())
    if check and result.returncode != 0:
        raise AssertionError(f"bundle run failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
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
                            env=subprocess_env())
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
