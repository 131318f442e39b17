"""Only rank 0 creates TensorBoard event files: under torchrun every rank builds the bundle's handlers, and rank 1
used to leave two empty event files in the shared log folder. A non-zero rank is faked through torch.distributed,
the functions ``is_rank_zero`` and ``for_this_rank`` read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from prod9_components.handlers.rank_zero import for_this_rank

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.parent.parent.name for p in ROOT.glob("bundles/*/configs/train.json"))


def _tensorboard_handler_ids(config: dict) -> list[str]:
    """Config ids (``train#handlers#4``) of every TensorBoard handler in a bundle's train.json."""
    return [f"{section}#handlers#{i}" for section in ("train", "validate")
            for i, handler in enumerate(config.get(section, {}).get("handlers", []))
            if isinstance(handler, dict) and "TensorBoard" in str(handler.get("_target_", ""))]


def _validate(handler) -> None:
    """One epoch of an evaluator-like engine that ends with a metric, with ``handler`` attached."""
    engine = Engine(lambda engine, batch: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update({"psnr": 21.0}))
    handler.attach(engine)
    engine.run([0, 1], max_epochs=1)
    handler.close()


def _event_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.rglob("events.out.tfevents.*")) if log_dir.exists() else []


def _fake_rank(monkeypatch, rank: int) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_bundles_tensorboard_handlers_write_on_rank_zero_only(bundle, tmp_path, monkeypatch):
    train_json = ROOT / "bundles" / bundle / "configs" / "train.json"
    ids = _tensorboard_handler_ids(json.loads(train_json.read_text()))
    assert len(ids) >= 2, f"{bundle}: expected train and validation TensorBoard handlers"
    log_dir = tmp_path / "logs"

    def build() -> list:
        parser = ConfigParser()
        parser.read_config(str(train_json))
        parser["output_dir"] = str(tmp_path)
        parser["log_dir"] = str(log_dir)
        return [parser.get_parsed_content(i) for i in ids]

    _fake_rank(monkeypatch, 1)
    handlers = build()  # what every rank does before for_this_rank
    assert for_this_rank(handlers) == []
    assert _event_files(log_dir) == [], f"{bundle}: rank 1 created TensorBoard files"

    monkeypatch.undo()  # rank 0 (no process group): an event file once a handler writes something
    handlers = build()
    assert _event_files(log_dir) == []  # opened on the first value, not when built
    _validate(handlers[-1])  # the validation handler: it writes the evaluator's metrics
    files = _event_files(log_dir)
    assert len(files) == 1 and files[0].stat().st_size > 88  # holds the psnr scalar, not only the file header


def test_a_writer_that_writes_nothing_opens_no_file(tmp_path):
    from prod9_components.handlers.tensorboard_stats import TensorBoardStatsHandler

    handler = TensorBoardStatsHandler(log_dir=str(tmp_path / "logs"), iteration_log=False, epoch_log=True)
    engine = Engine(lambda engine, batch: None)  # no metrics: MONAI still flushes each epoch
    handler.attach(engine)
    engine.run([0], max_epochs=2)
    handler.close()
    assert not (tmp_path / "logs").exists()
