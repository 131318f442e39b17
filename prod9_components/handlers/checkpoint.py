"""best.ckpt / last.ckpt / stage export, and resuming from last.ckpt.

Attach to the trainer *after* MONAI's ``ValidationHandler`` so that, at the end of an epoch, validation has run
before this handler compares the key metric. Every file is written atomically (temp file + rename): an
interrupted run leaves the old checkpoint or the new one, never a broken one. Only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from torch import nn

from prod9_components.networks.export import atomic_save, network_record

logger = logging.getLogger("prod9")


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class CheckpointHandler:
    """Save ``last.ckpt`` every epoch, ``best.ckpt`` (+ ``export_path``) when the key metric improves.

    ``last.ckpt`` holds everything a resumed run needs (trainer counters, networks, optimizers, scalers, the best
    metric so far); ``best.ckpt`` and the export are self-describing network records (see
    :mod:`prod9_components.networks.export`): weights, constructor arguments and preprocessing contract.

    Args:
        output_dir: where best.ckpt and last.ckpt go.
        network: the network whose weights best.ckpt / the export hold.
        save_dict: name -> object with ``state_dict``/``load_state_dict`` (optimizers, discriminator, ...);
            the trainer is added on attach.
        evaluator: the validation evaluator whose ``state.metrics`` hold ``key_metric``.
        key_metric: metric name in ``evaluator.state.metrics``.
        mode: "max" or "min" (e.g. a validation loss).
        export_path: optional extra copy of the best record for the next stage.
        preprocessing: preprocessing contract stored in records.
        stage: bundle name stored in records (a later stage refuses a file from the wrong stage).
        resume: load last.ckpt at start when it exists.
        network_args: constructor arguments for networks without ``init_args``.
        extra: further plain fields stored in best.ckpt / the export (e.g. the stage-1 export a transformer was
            trained on, its modalities).
    """

    def __init__(self, output_dir: str, network: nn.Module, save_dict: dict[str, Any] | None = None,
                 evaluator: Engine | None = None, key_metric: str | None = None, mode: str = "max",
                 export_path: str | None = None, preprocessing: dict | None = None, stage: str | None = None,
                 resume: bool = True, network_args: dict | None = None, extra: dict | None = None) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got '{mode}'")
        self.output_dir = Path(output_dir)
        self.network = network
        self.save_dict = dict(save_dict or {})
        self.evaluator = evaluator
        self.key_metric = key_metric
        self.mode = mode
        self.export_path = export_path
        self.preprocessing = preprocessing or {}
        self.stage = stage
        self.resume = resume
        self.network_args = network_args
        self.extra = dict(extra or {})
        self.best_metric = -math.inf if mode == "max" else math.inf
        self.best_epoch = 0

    @property
    def last_path(self) -> Path:
        return self.output_dir / "last.ckpt"

    @property
    def best_path(self) -> Path:
        return self.output_dir / "best.ckpt"

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        self.save_dict["network"] = self.network
        for name in ("scaler", "disc_scaler"):  # AMP state of our trainers (created in their constructors)
            if getattr(engine, name, None) is not None:
                self.save_dict[name] = getattr(engine, name)
        engine.add_event_handler(Events.STARTED, self.load_last)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def load_last(self, engine: Engine) -> None:
        if not (self.resume and self.last_path.is_file()):
            return
        checkpoint = torch.load(self.last_path, map_location="cpu", weights_only=True)
        max_epochs = engine.state.max_epochs  # the current config decides how long to train
        objects = {k: v for k, v in self.save_dict.items() if k in checkpoint}
        Checkpoint.load_objects(to_load=objects, checkpoint={k: checkpoint[k] for k in objects})
        engine.state.max_epochs = max_epochs
        self.best_metric = checkpoint.get("best_metric", self.best_metric)
        self.best_epoch = checkpoint.get("best_epoch", 0)
        logger.info(f"resumed from {self.last_path} at epoch {engine.state.epoch} "
                    f"(iteration {engine.state.iteration}); training to epoch {max_epochs}")

    def _improved(self, value: float) -> bool:
        return value > self.best_metric if self.mode == "max" else value < self.best_metric

    def epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        validated = self.evaluator is not None and self.evaluator.state.epoch == epoch
        if validated and self.key_metric:
            value = float(self.evaluator.state.metrics[self.key_metric])
            if math.isfinite(value) and self._improved(value):
                self.best_metric, self.best_epoch = value, epoch
                self.save_best(epoch)
        if is_rank_zero():
            state = {name: obj.state_dict() for name, obj in self.save_dict.items()}
            state.update(epoch=epoch, best_metric=self.best_metric, best_epoch=self.best_epoch, key_metric=self.key_metric)
            atomic_save(state, self.last_path)

    def save_best(self, epoch: int) -> None:
        if not is_rank_zero():
            return
        metrics = {k: float(v) for k, v in self.evaluator.state.metrics.items() if isinstance(v, (int, float))}
        record = network_record(self.network, self.preprocessing, self.network_args, **self.extra,
                                stage=self.stage, epoch=epoch, key_metric=self.key_metric, metrics=metrics)
        atomic_save(record, self.best_path)
        if self.export_path:
            atomic_save(record, self.export_path)
        logger.info(f"epoch {epoch}: {self.key_metric}={self.best_metric:.4f} is the best so far; wrote "
                    f"{self.best_path}" + (f" and {self.export_path}" if self.export_path else ""))

