"""A tqdm progress bar over training or evaluation iterations, with the running losses."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar


class ProgressBarHandler:
    """Attach Ignite's ``ProgressBar`` showing ``output_keys`` of the iteration output.

    MONAI attaches handlers with ``handler.attach(engine)``; Ignite's ``ProgressBar`` takes its output transform
    in ``attach``, so this thin handler carries it.
    """

    def __init__(self, output_keys: tuple[str, ...] = ("loss",), desc: str | None = None) -> None:
        self.output_keys = tuple(output_keys)
        self.desc = desc

    def _values(self, output) -> dict[str, float]:
        if not isinstance(output, dict):
            return {}
        return {k: float(output[k]) for k in self.output_keys if k in output and torch.is_tensor(output[k])
                and output[k].numel() == 1}

    def attach(self, engine: Engine) -> None:
        ProgressBar(persist=True, desc=self.desc).attach(engine, output_transform=self._values)
