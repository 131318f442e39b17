"""Mid-slice images of input vs output volumes: a TensorBoard handler and the grid it draws."""

from __future__ import annotations

import numpy as np
import torch
from ignite.engine import Engine, Events

from prod9_components.handlers.checkpoint import is_rank_zero


def mid_slice_grid(volumes: list[torch.Tensor | np.ndarray], value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Tile the axial, coronal and sagittal mid slices of each volume into one image.

    Args:
        volumes: each (D, H, W) or (1, D, H, W) in RAS voxel order, all the same shape (e.g. input, reconstruction).
        value_range: intensities mapped to [0, 1] (values outside are clipped).

    Returns:
        float32 array (rows = volumes, columns = the three views) in [0, 1], views padded to a common size.
    """
    rows = []
    for volume in volumes:
        v = volume.detach().float().cpu().numpy() if torch.is_tensor(volume) else np.asarray(volume, np.float32)
        v = v.reshape(v.shape[-3:])
        x, y, z = (s // 2 for s in v.shape)
        # Rotate so anterior/superior point up, as radiologists look at RAS volumes.
        rows.append([np.rot90(v[:, :, z]), np.rot90(v[:, y, :]), np.rot90(v[x, :, :])])
    height = max(view.shape[0] for row in rows for view in row)
    width = max(view.shape[1] for row in rows for view in row)
    lo, hi = value_range
    tiles = [[np.pad(view, ((0, height - view.shape[0]), (0, width - view.shape[1]))) for view in row] for row in rows]
    grid = np.concatenate([np.concatenate(row, axis=1) for row in tiles], axis=0)
    return np.clip((grid - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


class MidSliceWriter:
    """Writes :func:`mid_slice_grid` images to TensorBoard, from rank 0 only, opening the log on first use.

    Args:
        log_dir: TensorBoard log directory; None writes nothing.
    """

    def __init__(self, log_dir: str | None) -> None:
        self.log_dir = log_dir
        self._writer = None

    def write(self, tag: str, volumes: list[torch.Tensor], step: int,
              value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        if self.log_dir is None or not is_rank_zero():
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        self._writer.add_image(tag, mid_slice_grid(volumes, value_range), step, dataformats="HW")
        self._writer.flush()


class MidSliceImageHandler:
    """After each evaluation, write mid slices of the first volume's ``keys`` (rows) to TensorBoard.

    Args:
        log_dir: TensorBoard log directory (``<output_dir>/logs``).
        keys: output keys to show, one row each (e.g. ``("image", "pred")``).
        tag: TensorBoard tag.
        value_range: intensity range of the volumes.
    """

    def __init__(self, log_dir: str, keys: tuple[str, ...] = ("image", "pred"), tag: str = "val/input_vs_recon",
                 value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        self.log_dir = log_dir
        self.keys = tuple(keys)
        self.tag = tag
        self.value_range = tuple(value_range)
        self._slices = MidSliceWriter(log_dir)
        self._first: list[torch.Tensor] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._capture)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._first = None

    def _capture(self, engine: Engine) -> None:
        if self._first is not None:
            return
        output = engine.state.output
        item = output[0] if isinstance(output, list) else output
        if not all(k in item for k in self.keys):  # e.g. validation without translation: nothing to draw
            return
        self._first = [item[k][0 if item is output else slice(None)].detach().cpu() for k in self.keys]

    def _write(self, engine: Engine) -> None:
        if self._first is not None:
            self._slices.write(self.tag, self._first, engine.state.epoch, self.value_range)
