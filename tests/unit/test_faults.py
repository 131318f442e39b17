"""Faults during training: a non-finite loss stops the run and keeps the last good checkpoint; a write that fails
half-way (the disk is full) leaves the previous checkpoint intact."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from monai.networks.schedulers import RFlowScheduler

from prod9_components.engines.diffusion_trainer import RectifiedFlowTrainer
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
