"""The demo runs its two families side by side, each in a process of its own with its output in a log of its own,
and reports every family's failure in one line."""

from __future__ import annotations

import os
import re

import pytest

from tests.helpers import script_module


def test_each_family_runs_in_its_own_process_and_its_failure_is_reported(tmp_path):
    script_module("demo")  # puts scripts/ on sys.path, which the spawned workers inherit
    import demo  # by its importable name: the workers unpickle demo.run_family and demo.Stage from it

    stages = {s.name: s for s in demo.STAGES}
    # Stages whose first step fails at once (the stage they read has not run), so the test costs two process starts.
    families = [[stages["maskgit_stage2_label"]], [stages["maisi_stage2_diffusion"]]]
    context = demo.stage_context(tmp_path, {"data": str(tmp_path / "data")}, demo.SPACING)
    with pytest.raises(demo.DemoError) as failed:
        demo.run_side_by_side(families, context, 2)
    message = str(failed.value)
    assert "\n" not in message
    for stage, needs in (("maskgit_stage2_label", "maskgit_stage1"), ("maisi_stage2_diffusion", "maisi_stage1_vae")):
        assert f"demo failed at {stage}: needs {tmp_path / needs}/best.ckpt" in message, message
    pids = []
    for family, stage in (("maskgit", "maskgit_stage2_label"), ("maisi", "maisi_stage2_diffusion")):
        log = (tmp_path / f"{family}.log").read_text()
        assert f"=== {stage} ===" in log  # the stage's own output went to its family's log
        head = re.fullmatch(rf"{family} in process (\d+), (\d+) torch thread\(s\)", log.splitlines()[0])
        assert head and int(head[2]) == demo.threads_per_job(2), log
        pids.append(int(head[1]))
    assert len({*pids, os.getpid()}) == 3
