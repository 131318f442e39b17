"""The seed's workflow document, run verbatim: every ``prod9-train-*`` command of its fenced bash blocks, in order,
with tiny overrides appended, on a tiny demo dataset (``BRATS_DATA_DIR``, as the seed says), from one working
directory so that the ``outputs/...`` paths chain stage to stage as the document has them.

The document is a copy of the seed's ``TRAINING_WORKFLOWS.md`` in ``tests/fixtures/seed`` (a clean clone has no
``/work/shared``). What the test adds to a command, and why:
- the bundle's ``configs/tiny.json`` ids as flags (tiny network, 1 epoch, 2 batches), 4 mm voxels and fewer
  validation samples (``TINY_OVERRIDES``, ``STAGE_OVERRIDES``; only ids the bundle reads), unless the command gives
  the flag itself;
- ``--overwrite`` where the command's ``--output`` already exists: the seed writes ``reconstructed.nii.gz`` from four
  commands, and replacing an output takes ``--overwrite`` (design §10, which wins over the seed);
- commands the End-to-End section repeats word for word run once (the second run would only be refused for
  writing the same metrics file again).
``ls`` lines run too (they check the seed's export paths); ``export`` lines are replaced by the environment.
``pytest -s`` prints each command's status and seconds. The chain takes a few minutes on 2 idle cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from prod9_components.cli.bundle_runner import bundle_ids, bundles_root, reads_id
from prod9_components.cli.seed_configs import SEED_CONFIGS
from prod9_components.data.demo import make_demo_dataset
from tests.helpers import ROOT, cli

SEED_DOC = ROOT / "tests" / "fixtures" / "seed" / "TRAINING_WORKFLOWS.md"
SPACING = [4.0, 4.0, 4.0]  # 5 mm demo volumes at 4 mm: about 35x43x35 voxels of brain
TINY_OVERRIDES = {"epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "num_workers": 0,
                  "spacing": SPACING, "reference_cases": 1, "training_reference_cases": 2, "diversity_samples": 2,
                  "segmenter_steps": 5}
# The label-conditional transformer learns (and its validation samples) one modality, not four: a quarter of the
# sampling; the seed's ``generate --modality T1`` asks for that one.
STAGE_OVERRIDES = {"maskgit_stage2_label": {"target_modalities": ["T1"]}}


def seed_commands(text: str) -> list[str]:
    """The shell lines of the document's ```bash blocks: continuations joined, comments dropped, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(" ".join(line.split()))
    return commands


def runnable(commands: list[str]) -> list[str]:
    """The prod9 commands and ``ls`` checks, each distinct one once (``export`` lines: see the module docstring)."""
    seen, out = set(), []
    for command in commands:
        if command.startswith(("prod9-train-", "python -m monai.bundle", "ls ")) and command not in seen:
            seen.add(command)
            out.append(command)
    return out


def tiny_flags(args: list[str]) -> list[str]:
    """The tiny overrides for one command, as flags; ids the command sets itself are left to it."""
    stage = SEED_CONFIGS[args[args.index("--config") + 1]].stage
    tiny = json.loads((ROOT / "bundles" / stage / "configs" / "tiny.json").read_text())
    tiny.pop("export_path", None)  # an expression: the seed's config name sets the seed's export path
    given = {a[2:].replace("-", "_") for a in args if a.startswith("--")}
    ids = bundle_ids(bundles_root() / stage)
    flags = []
    for key, value in {**tiny, **TINY_OVERRIDES, **STAGE_OVERRIDES.get(stage, {})}.items():
        if key not in given and reads_id(ids, key):  # not `"" in ids`: the root id is in every bundle
            flags += [f"--{key}", json.dumps(value).replace(" ", "") if not isinstance(value, str) else value]
    return flags


def test_the_seed_document_is_the_seeds():
    """The copy in tests/fixtures is the seed's document (checked where the shared folder exists)."""
    shared = Path("/work/shared/seed/TRAINING_WORKFLOWS.md")
    if not shared.is_file():
        pytest.skip("no shared seed folder (a user's clone)")
    assert SEED_DOC.read_text() == shared.read_text()


def test_the_parser_finds_every_seed_command():
    commands = runnable(seed_commands(SEED_DOC.read_text()))
    configs = {c.split("--config ")[1].split()[0] for c in commands if "--config " in c}
    assert configs == set(SEED_CONFIGS)  # each seed config name is used, and the table knows each one
    assert sum(c.startswith("prod9-train-") for c in commands) == 28


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PROD9_SEED_WORKFLOWS"), reason="the seed's whole workflow (about 6 CPU-minutes) "
                    "runs with `make test-seed`, outside `make test`'s 20-minute budget")
@pytest.mark.timeout(2400)  # 28 commands: about 6 CPU-minutes; on 2 shared, busy cores more than the default 900 s
def test_every_seed_command_runs(tmp_path, monkeypatch):
    data = tmp_path / "brats"
    make_demo_dataset(data, num_cases=6, seed=0, shape=(48, 48, 32))
    work = tmp_path / "work"
    work.mkdir()
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    for name in ("volume.nii.gz", "large_volume.nii.gz"):  # the user's own volumes the seed's infer lines read
        shutil.copy(next(case.glob("*_t1.nii.gz")), work / name)
    monkeypatch.chdir(work)
    monkeypatch.setenv("BRATS_DATA_DIR", str(data))
    failures = []
    for command in runnable(seed_commands(SEED_DOC.read_text())):
        args, start = shlex.split(command), time.monotonic()
        if args[0] == "ls":
            result = subprocess.run(args, capture_output=True, text=True, cwd=work)
        else:
            if "--output" in args and (work / args[args.index("--output") + 1]).is_file():
                args.append("--overwrite")
            result = cli(args[0], *args[1:], *tiny_flags(args), check=False)
        print(f"{'ok ' if result.returncode == 0 else 'FAILED'} {time.monotonic() - start:5.0f} s  {command}",
              flush=True)  # pytest -s: the chain's progress
        if result.returncode != 0:
            failures.append(f"{command}\n  -> {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    assert not failures, "seed commands that failed:\n" + "\n".join(failures)
