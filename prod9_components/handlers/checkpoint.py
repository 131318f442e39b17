"""best.ckpt / last.ckpt / stage export, and resuming from last.ckpt.

Attach to the trainer *after* MONAI's ``ValidationHandler`` so that, at the end of an epoch, validation has run
before this handler compares the key metric. Every file is written atomically (temp file + rename): an
interrupted run leaves the old checkpoint or the new one, never a broken one. Only rank 0 writes.

A resume continues only the run that wrote ``last.ckpt``: the file carries a fingerprint of the network's constructor
arguments, the data split and the upstream files (``extra`` fields ending in ``_sha256``/``_fingerprint``), and any
field that differs now refuses the resume in one line. The config's learning rate wins over the saved one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from prod9_components.data.provenance import resume_flag, resume_refusal, splits_fingerprint
from prod9_components.networks.export import atomic_save, network_record, unwrap

logger = logging.getLogger("prod9")

# ``extra`` fields that identify an upstream file (a stage-1 export, a base transformer): part of the fingerprint.
UPSTREAM_SUFFIXES = ("_sha256", "_fingerprint")


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
        resume: load last.ckpt at start when it exists (a bool, or "true"/"false" as a flag passes it).
        network_args: constructor arguments for networks without ``init_args``.
        extra: further plain fields stored in best.ckpt / the export (e.g. the stage-1 export a transformer was
            trained on, its modalities); those ending in ``_sha256``/``_fingerprint`` also enter the fingerprint.
        splits: the data split this run trains on (``datalist.json``'s content), for the fingerprint.

    After ``run()``, :attr:`nothing_trained` is a sentence when the resumed run had already reached its last epoch.
    """

    def __init__(self, output_dir: str, network: nn.Module, save_dict: dict[str, Any] | None = None,
                 evaluator: Engine | None = None, key_metric: str | None = None, mode: str = "max",
                 export_path: str | None = None, preprocessing: dict | None = None, stage: str | None = None,
                 resume: bool | str = True, network_args: dict | None = None, extra: dict | None = None,
                 splits: Mapping | None = None) -> None:
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
        self.resume = resume_flag(resume)
        self.network_args = network_args
        self.extra = dict(extra or {})
        self.splits = splits
        self.best_metric = -math.inf if mode == "max" else math.inf
        self.best_epoch = 0
        self.nothing_trained: str | None = None
        self._fingerprint: dict | None = None

    @property
    def last_path(self) -> Path:
        return self.output_dir / "last.ckpt"

    @property
    def best_path(self) -> Path:
        return self.output_dir / "best.ckpt"

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        self.save_dict["network"] = self.network
        engine.add_event_handler(Events.STARTED, self.add_scalers)
        engine.add_event_handler(Events.STARTED, self.load_last)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def add_scalers(self, engine: Engine) -> None:
        """Save the trainer's AMP loss scalers too. At start, not in :meth:`attach`: MONAI attaches handlers inside
        the workflow's constructor, before our trainers' constructors have made their scalers."""
        for name in ("scaler", "disc_scaler"):
            if getattr(engine, name, None) is not None:
                self.save_dict[name] = getattr(engine, name)

    def fingerprint(self) -> dict:
        """What this run is made from: network constructor arguments, a hash of the data split, upstream file hashes
        (computed once: the split's hash stats every file)."""
        if self._fingerprint is None:
            args = self.network_args
            if args is None:
                args = getattr(unwrap(self.network), "init_args", None)
            fingerprint = {"network_args": dict(args)} if args is not None else {}
            if self.splits is not None:
                fingerprint["splits"] = splits_fingerprint(self.splits)
            fingerprint.update({k: v for k, v in self.extra.items() if k.endswith(UPSTREAM_SUFFIXES)})
            self._fingerprint = fingerprint
        return self._fingerprint

    def check_fingerprint(self, saved: Mapping) -> None:
        """Raise a one-line ValueError naming last.ckpt when a field both fingerprints hold differs (a file written
        before fingerprints existed holds none: nothing to compare)."""
        current = self.fingerprint()
        for key in saved.keys() & current.keys():
            if key == "network_args":
                before, now = _plain(saved[key]), _plain(current[key])
                for name in sorted(before.keys() | now.keys()):
                    if before.get(name) != now.get(name):
                        raise resume_refusal(self.last_path, f"it was written by a network with {name}="
                                             f"{before.get(name)}, the config now builds {name}={now.get(name)}")
            elif key == "splits" and saved[key] != current[key]:
                raise resume_refusal(self.last_path, "it was trained on another data split (other cases, files or "
                                                     "file sizes) than this run's")
            elif _plain(saved[key]) != _plain(current[key]):
                path = self.extra.get(f"{key.rsplit('_', 1)[0]}_path")  # autoencoder_sha256 -> autoencoder_path
                raise resume_refusal(self.last_path, f"it was trained with {key}={str(saved[key])[:16]}…, this run "
                                                     f"has {str(current[key])[:16]}… (another upstream file"
                                                     + (f": {path})" if path else ")"))

    def load_last(self, engine: Engine) -> None:
        """Restore everything from last.ckpt when resuming (checked against this run's fingerprint first), then put
        the config's learning rates back in place of the saved ones."""
        if not (self.resume and self.last_path.is_file()):
            return
        try:
            checkpoint = torch.load(self.last_path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated, not a torch file, or a pickle that would run code
            raise resume_refusal(self.last_path, f"cannot be read ({type(error).__name__}: "
                                                 f"{_first_line(error)})") from None
        if not isinstance(checkpoint, dict) or "trainer" not in checkpoint:
            raise resume_refusal(self.last_path, "is not a prod9 last.ckpt (expected a dict with the trainer state)")
        if "fingerprint" not in checkpoint:
            logger.warning(f"{self.last_path} predates fingerprints: resuming without checking it was written by this "
                           "network, data split and upstream files")
        self.check_fingerprint(checkpoint.get("fingerprint", {}))
        max_epochs = engine.state.max_epochs  # the current config decides how long to train
        config_lrs = {name: [group.get("initial_lr", group["lr"]) for group in obj.param_groups]
                      for name, obj in self.save_dict.items() if isinstance(obj, Optimizer)}
        for name, obj in self.save_dict.items():
            if name not in checkpoint:
                continue
            try:
                if isinstance(obj, nn.Module):  # DDP/compile wrappers: the bare network's keys, as saved
                    without_parallel(obj).load_state_dict(_without_ddp_prefix(checkpoint[name]))
                else:
                    obj.load_state_dict(checkpoint[name])
            except Exception as error:
                raise resume_refusal(self.last_path, f"its {name!r} does not fit this run ({type(error).__name__}: "
                                                     f"{_first_line(error)})") from None
        engine.state.max_epochs = max_epochs
        self.apply_config_lrs(config_lrs, checkpoint)
        self.best_metric = checkpoint.get("best_metric", self.best_metric)
        self.best_epoch = checkpoint.get("best_epoch", 0)
        logger.info(f"resumed from {self.last_path} at epoch {engine.state.epoch} "
                    f"(iteration {engine.state.iteration}); training to epoch {max_epochs}")
        if engine.state.epoch >= max_epochs:  # Ignite's loop will not run: say so instead of reporting training
            self.nothing_trained = (f"already at epoch {engine.state.epoch} in {self.last_path}, nothing trained "
                                    f"(--epochs {max_epochs}; raise it to train on, or {_WAY_OUT_SHORT})")
            logger.info(self.nothing_trained)

    def apply_config_lrs(self, config_lrs: dict[str, list[float]], checkpoint: Mapping) -> None:
        """Give the restored optimizers the config's learning rates (``config_lrs``: per optimizer, per group, taken
        before loading) and the restored LambdaLR schedules those as base rates, at the restored step."""
        for name, lrs in config_lrs.items():
            optimizer = self.save_dict[name]
            saved = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
                if "initial_lr" in group:
                    group["initial_lr"] = lr
            if name in checkpoint and saved != lrs:
                logger.info(f"{name}: learning rate {lrs} from the config (last.ckpt had {saved})")
        for scheduler in self.save_dict.values():
            if isinstance(scheduler, LambdaLR):  # lr at the restored step = new base rate x the schedule's factor
                groups = scheduler.optimizer.param_groups
                scheduler.base_lrs = [group.get("initial_lr", group["lr"]) for group in groups]
                for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)
                scheduler._last_lr = [group["lr"] for group in groups]

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
        if is_rank_zero():  # without DDP: a DDP run's last.ckpt resumes with or without DDP (an EMA keeps its count)
            state = {name: (without_parallel(obj) if isinstance(obj, nn.Module) else obj).state_dict()
                     for name, obj in self.save_dict.items()}
            state.update(epoch=epoch, best_metric=self.best_metric, best_epoch=self.best_epoch,
                         key_metric=self.key_metric, fingerprint=self.fingerprint())
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



_WAY_OUT_SHORT = "--resume false to start over"


def without_parallel(network: nn.Module) -> nn.Module:
    """``network`` without DistributedDataParallel / DataParallel / torch.compile wrappers; unlike
    :func:`~prod9_components.networks.export.unwrap` it keeps an EMA wrapper, whose update count last.ckpt needs."""
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def _without_ddp_prefix(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A state dict saved from a DDP-wrapped network (every key ``module.…``, as last.ckpt files were before
    networks were saved unwrapped) with the bare network's keys."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return state


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (constructor arguments compare by value, whatever sequence type held them)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _first_line(error: BaseException, limit: int = 240) -> str:
    """An error's text on one line (a state-dict mismatch puts its reasons on the lines after the first)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "…"
