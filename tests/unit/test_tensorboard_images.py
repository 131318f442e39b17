"""Mid-slice images reach TensorBoard once per call, and nothing is written without a log directory."""

from __future__ import annotations

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from prod9_components.handlers.tensorboard_images import MidSliceWriter, mid_slice_grid


def test_mid_slice_writer_logs_one_grid_per_call(tmp_path):
    volumes = [torch.rand(1, 8, 10, 6), torch.rand(8, 10, 6)]
    grid = mid_slice_grid(volumes)
    assert grid.shape == (2 * 10, 3 * 10) and 0.0 <= grid.min() and grid.max() <= 1.0  # 2 rows x 3 views padded to 10x10
    writer = MidSliceWriter(str(tmp_path / "logs"))
    writer.write("val/samples_T1", volumes, step=3)
    writer.write("val/samples_T1", volumes, step=4)
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    assert [image.step for image in events.Images("val/samples_T1")] == [3, 4]
    MidSliceWriter(None).write("val/none", volumes, step=0)  # metrics-only handlers: no directory, no error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]
