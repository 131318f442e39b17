"""Faults during training: a non-finite loss stops the run and keeps the last good checkpoint; a write that fails
half-way (the disk is full) leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from monai.networks.schedulers import RFlowScheduler

from prod9_components.engines.maisi_diffusion_trainer import RectifiedFlowTrainer
from prod9_components.handlers.checkpoint import CheckpointHandler
from prod9_components.handlers.nan_guard import NaNGuard, NonFiniteLossError
from prod9_components.networks.maisi_diffusion import MaisiDiffusionUNet


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, one_thread):
    torch.manual_seed(0)
    network = MaisiDiffusionUNet(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, False],
                                 norm_num_groups=4, num_head_channels=4)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    good = {"latent": torch.randn(1, 4, 4, 4, 4), "label": torch.tensor([1])}
    broken = {"latent": torch.full((1, 4, 4, 4, 4), float("nan")), "label": torch.tensor([1])}
    handlers = [NaNGuard(["loss"]), CheckpointHandler(str(tmp_path), network, {"optimizer": optimizer})]
    # one batch per epoch: epoch 1 trains on the good batch, epoch 2 meets the NaN
    trainer = RectifiedFlowTrainer("cpu", 3, [good, broken], network, optimizer, RFlowScheduler(1000),
                                   epoch_length=1, train_handlers=handlers)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, iteration 2: stopping \(the last "
                                                 r"checkpoint is kept\)"):
        trainer.run()
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["trainer"]["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in last["network"].values())


def test_a_checkpoint_write_that_fails_half_way_leaves_the_previous_one(tmp_path):
    """A real short write: the OS file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the write fail with EFBIG
    after 64 kB, as a full disk fails with ENOSPC; atomic_save must leave the old file and no temp file."""
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from prod9_components.networks.export import atomic_save
        path = {str(tmp_path / "last.ckpt")!r}
        atomic_save({{"epoch": 1, "w": torch.ones(10)}}, path)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            atomic_save({{"epoch": 2, "w": torch.ones(1_000_000)}}, path)
        except Exception as error:  # torch re-raises the OSError as a RuntimeError of its zip writer
            causes = [error]
            while causes[-1].__context__ is not None:
                causes.append(causes[-1].__context__)
            print("failed:", [getattr(e, "errno", None) for e in causes])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "failed:" in result.stdout and "27" in result.stdout, result.stderr  # EFBIG
    kept = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the half-written temp file is gone


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_kill_mid_write_keeps_the_old_file_and_the_next_write_removes_its_temp_file(tmp_path):
    """SIGKILL while atomic_path's temp file is half written: the target keeps its old bytes; the temp file left
    behind is removed by the next atomic write into that folder (its writer is dead), with nothing else."""
    from prod9_components import atomic

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")
    script = textwrap.dedent(f"""
        import sys, time
        from prod9_components.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            open(tmp, "wb").write(b"half of the new")
            print("writing", flush=True)
            time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
    finally:
        process.kill()
        process.wait()
    assert target.read_bytes() == b"old"
    leftover = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftover) == 1 and atomic.TEMP_PATTERN.match(leftover[0].name)
    assert f"-{process.pid}-" in leftover[0].name

    atomic.write_json({"a": 1}, tmp_path / "other.json")  # the next write into the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "other.json"]


def test_the_temp_file_sweep_keeps_live_writers_and_files_it_did_not_make(tmp_path):
    from prod9_components.atomic import TEMP_MARK, _host, remove_stale_temp_files

    host = _host()
    dead = tmp_path / f".best.ckpt{TEMP_MARK}{host}-{_dead_pid()}-abc_12xy.tmp"
    live = tmp_path / f".best.ckpt{TEMP_MARK}{host}-{os.getpid()}-abc_12xy.tmp"
    other_host = tmp_path / f".best.ckpt{TEMP_MARK}elsewhere{host}-{_dead_pid()}-abc_12xy.npz"
    unrelated = [tmp_path / name for name in (".best.ckpt.abc_12xy.tmp", ".hidden", f"case{TEMP_MARK}1-2-abcdefgh",
                                              f".x{TEMP_MARK}{host}-notapid-abc_12xy.tmp", "best.ckpt")]
    for path in (dead, live, other_host, *unrelated):
        path.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other_host, *unrelated))
