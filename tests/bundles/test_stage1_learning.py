"""A short CPU training of the tiny stage-1 bundle on demo data must improve the reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from tests.stage1_helpers import CONFIGS

pytestmark = pytest.mark.slow


def test_short_training_lowers_reconstruction_loss(demo_dataset_dir, tmp_path):
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "tiny.json")], workflow_type="train",
        dataset_dir=demo_dataset_dir, output_dir=str(tmp_path / "run"), spacing=[4.0, 4.0, 4.0], epochs=6,
        limit_train_batches=12, val_interval=100, limit_val_batches=4, **{"loss#disc_start": 10_000})
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    recon_losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: recon_losses.append(float(e.state.output["recon_loss"])))

    evaluator.run()
    psnr_before = evaluator.state.metrics["psnr"]
    workflow.run()
    evaluator.run()
    psnr_after = evaluator.state.metrics["psnr"]
    workflow.finalize()

    first, last = np.mean(recon_losses[:12]), np.mean(recon_losses[-12:])
    print(f"L1 first epoch {first:.4f} -> last epoch {last:.4f}; validation PSNR {psnr_before:.2f} -> {psnr_after:.2f} dB")
    assert len(recon_losses) == 72
    assert last < 0.7 * first
    assert psnr_after > psnr_before + 2.0
