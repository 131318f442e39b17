"""What tests use to run the bundles and console scripts for real (tiny networks on the small demo data): each
bundle's config folder, ``python -m monai.bundle run`` and the ``prod9-train-*`` scripts, with a user's arguments,
in the test's process (:func:`as_a_process`)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def script_module(name: str):
    """``scripts/<name>.py`` as a module (scripts/ is not a package), loaded once and registered first, as
    dataclasses need; scripts/ joins the end of ``sys.path``, since a script imports its siblings (as
    ``python scripts/<name>.py`` lets it)."""
    import importlib.util

    if str(ROOT / "scripts") not in sys.path:
        sys.path.append(str(ROOT / "scripts"))
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
# Stage 2's validation samples scored for one modality against one training case, for runs whose sample scores no
# test reads: scoring four modalities against four cases is most of a tiny stage-2 run (17 of 28 s, one thread).
FEW_SAMPLES = {"training_reference_cases": 1, "validate#samples#modalities": "['T2']"}


def subprocess_env() -> dict:
    """The environment of every process a test starts: read when the process starts, so the conftest's one-thread
    setting under xdist (set after this module is imported) reaches every run alike. Warnings of the libraries would
    bury the error a failed run's assertion shows."""
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def config_list(configs: Path, *names: str) -> str:
    """A MONAI config-file list: ``names`` inside ``configs`` (an absolute path is kept as it is)."""
    return "[" + ",".join(f"'{configs / n}'" for n in names) + "]"


def bundle_run(configs: Path, names: list[str], overrides: dict, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` with the bundle's logging.conf (in this process: :func:`run_module`).

    Args:
        configs: the bundle's config folder (:data:`STAGE1`, :data:`VAE`, ...); its logging.conf is used.
        names: config files layered in this order (``["train.json", "tiny.json"]``).
        overrides: ``--id value`` pairs.
        check: raise with the run's output tail when it fails.
    """
    args = ["run", "--config_file", config_list(configs, *names), "--logging_file", str(configs / "logging.conf")]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return _checked(run_module("monai.bundle", args), check)


def cli(command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """A console script (``prod9-train-autoencoder ...``): its installed entry point, in this process
    (:func:`as_a_process`)."""
    (entry,) = entry_points(group="console_scripts", name=command)
    return _checked(as_a_process([command, *args], lambda: entry.load()(list(args))), check)


def run_module(module: str, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in this process: the module runs as ``__main__`` with that ``sys.argv``
    (:func:`as_a_process`)."""
    import runpy

    def main() -> None:
        argv = sys.argv
        sys.argv = [module, *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        finally:
            sys.argv = argv

    return as_a_process([module, *args], main, cwd)


def as_a_process(argv: list[str], main: Callable[[], None], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Call ``main()`` as a new process runs it: in ``cwd`` (default: the current directory), output captured,
    warnings off (as :func:`subprocess_env` sets them), ``SystemExit`` as the exit code, and an error that escapes
    through ``sys.excepthook`` with exit code 1, as the interpreter does.

    The same code without a new interpreter's start-up: ``import monai`` alone takes 10-15 s on two busy cores, which
    made up half of the suite's time when every run was a process. Tests about the process itself (torchrun, a
    killed run, the installed wheel, an exported folder run alone, a user's umask) start real ones.
    """
    import warnings

    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            contextlib.chdir(cwd or os.getcwd()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except Exception as error:  # noqa: BLE001 - what the interpreter does with an uncaught error
            sys.excepthook(type(error), error, error.__traceback__)
            code = 1
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def _checked(result: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    """``result``, or, with ``check`` and a non-zero exit code, an AssertionError with the run's output tail."""
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, result.args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def t1_volumes(folder: Path, n: int) -> list[dict]:
    """``n`` NIfTI T1 volumes of 16^3 voxels at 4 mm (a 12x10x12 block of seeded noise in air), written to ``folder``
    as ``case<i>_t1.nii.gz``; returns translation inputs ``{"t1": path, "case": "case<i>"}``."""
    import nibabel as nib
    import numpy as np

    items = []
    for i in range(n):
        data = np.zeros((16, 16, 16), np.float32)
        data[2:14, 3:13, 2:14] = np.random.default_rng(i).uniform(100, 900, (12, 10, 12))
        path = Path(folder) / f"case{i}_t1.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), path)
        items.append({"t1": str(path), "case": f"case{i}"})
    return items
