"""Stop training with a clear message when the loss stops being finite."""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite."""


class NaNGuard:
    """Raise :class:`NonFiniteLossError` at the first iteration whose output ``loss_keys`` are not finite.

    Attach it before the checkpoint handler: the run stops before a broken state is saved, so last.ckpt keeps the
    last good epoch.
    """

    def __init__(self, loss_keys: tuple[str, ...] = ("loss",)) -> None:
        self.loss_keys = tuple(loss_keys)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        for key in self.loss_keys:
            value = output.get(key) if isinstance(output, dict) else None
            if value is None:
                continue
            value = float(value.detach().float().mean()) if torch.is_tensor(value) else float(value)
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{key} is {value} at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
                    "stopping (the last checkpoint is kept); try a lower learning_rate or amp=false")
