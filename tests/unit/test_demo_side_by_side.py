"""The demo runs its two families side by side, each in a process of its own with its output in a log of its own,
and reports every family's failure in one line."""

from __future__ import annotations

import os
import re
import time

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


def test_the_first_family_builds_the_segmenter_and_its_failure_is_only_reported(tmp_path, capfd):
    """With a ControlNet among the stages the first family's worker builds the tumour segmenter (no third process);
    when it cannot be built (here: no dataset) the demo says so in one line and goes on, and only the families'
    failures fail it."""
    script_module("demo")
    import demo

    stages = {s.name: s for s in demo.STAGES}
    families = [[stages["maskgit_stage3_controlnet"]], [stages["maisi_stage3_controlnet"]]]
    context = demo.stage_context(tmp_path, {"data": str(tmp_path / "data")}, demo.SPACING)
    with pytest.raises(demo.DemoError) as failed:
        demo.run_side_by_side(families, context, 2)
    assert "segmenter" not in str(failed.value)
    assert not (tmp_path / "segmenter.log").exists()
    said = [line for line in capfd.readouterr().out.splitlines() if line.startswith("[segmenter]")]
    assert len(said) == 1 and "not built in advance" in said[0] and str(tmp_path / "data") in said[0], said


def test_a_family_builds_the_segmenter_after_its_first_stage(monkeypatch, tmp_path):
    """Between MaskGiT's stage 1 and the rest, while MAISI's longer stage 1 runs; first when the first stage is itself
    scored by it; never when not asked."""
    demo = script_module("demo")
    calls = []
    monkeypatch.setattr(demo, "run_stages", lambda stages, context: calls.append(stages[0].name) or [
        {"stage": stages[0].name, "seconds": 0.0, "scores": []}])
    monkeypatch.setattr(demo, "train_segmenter", lambda context, console: calls.append("segmenter"))
    maskgit = [s for s in demo.STAGES if s.family == "maskgit"]
    with open(os.devnull, "w") as console:
        for stages, segmenter, expected in (
                (maskgit, True, ["maskgit_stage1", "segmenter", *(s.name for s in maskgit[1:])]),
                (maskgit[-1:], True, ["segmenter", "maskgit_stage3_controlnet"]),
                (maskgit, False, [s.name for s in maskgit])):
            calls.clear()
            results, failure = demo.run_family(stages, {}, segmenter, console)
            assert failure is None and calls == expected, calls


def test_a_worker_takes_the_freed_cores_once_told_even_in_the_middle_of_its_work():
    """The thread count is set by the main thread (torch's is per thread), while it is busy, soon after the event."""
    import signal
    import threading

    import torch

    demo = script_module("demo")
    before = torch.get_num_threads()
    event = threading.Event()
    try:
        torch.set_num_threads(1)
        demo.take_cores_when(event, 3)
        x = torch.rand(64, 64)
        for _ in range(50):  # busy, as a training loop is
            x = (x @ x).tanh()
        assert torch.get_num_threads() == 1
        event.set()
        deadline = time.monotonic() + 10
        while torch.get_num_threads() != 3 and time.monotonic() < deadline:
            x = (x @ x).tanh()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
