"""Resuming from last.ckpt (CheckpointHandler on a real Ignite engine, tiny network, 3 iterations an epoch): a resume
continues only the run that wrote the file, applies the config's learning rate, reads the files DDP runs wrote before
networks were saved unwrapped, and says so when there is nothing left to train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import LrScheduleHandler
from torch import nn

from prod9_components.data.provenance import check_resumed_splits, resume_flag
from prod9_components.engines.lr_schedule import lr_schedule
from prod9_components.handlers.checkpoint import CheckpointHandler

ITERATIONS = 3  # per epoch


class TinyNet(nn.Module):
    """A two-layer network that describes itself (``init_args``) like the project's networks."""

    def __init__(self, width: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.init_args = {"width": width, "dropout": dropout}
        self.layers = nn.Sequential(nn.Linear(2, width), nn.Dropout(dropout), nn.Linear(width, 1))

    def forward(self, x):
        return self.layers(x)


def run(folder, epochs: int, lr: float = 1e-2, width: int = 4, dropout: float = 0.0, splits=None, extra=None,
        resume=True, total_epochs: int | None = None) -> dict:
    """Train TinyNet for ``epochs`` (resuming from ``folder/last.ckpt`` if there) with a warm-up + cosine schedule
    over ``total_epochs``; returns the engine, handler, network, optimizer and the lr after every iteration."""
    torch.manual_seed(0)
    network = TinyNet(width, dropout)
    optimizer = torch.optim.SGD(network.parameters(), lr=lr)
    scheduler = lr_schedule(optimizer, "cosine", total_steps=(total_epochs or epochs) * ITERATIONS, warmup_steps=2)

    def step(engine, batch):
        optimizer.zero_grad()
        loss = network(torch.full((1, 2), float(batch))).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    engine = Engine(step)
    LrScheduleHandler(scheduler, print_lr=False, epoch_level=False).attach(engine)
    handler = CheckpointHandler(str(folder), network, save_dict={"optimizer": optimizer, "lr_scheduler": scheduler},
                                resume=resume, splits=splits, extra=extra)
    handler.attach(engine)
    lrs: dict[int, float] = {}
    engine.add_event_handler(Events.ITERATION_COMPLETED,
                             lambda e: lrs.__setitem__(e.state.iteration, optimizer.param_groups[0]["lr"]))
    engine.run(list(range(ITERATIONS)), max_epochs=epochs)
    return {"engine": engine, "handler": handler, "network": network, "optimizer": optimizer, "lrs": lrs}


def scheduled_lr(lr: float, steps: int, total_steps: int) -> float:
    """The lr the schedule gives after ``steps`` iterations at base rate ``lr``."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = lr_schedule(optimizer, "cosine", total_steps=total_steps, warmup_steps=2)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


def test_a_changed_learning_rate_is_applied_on_resume(tmp_path):
    run(tmp_path, epochs=1, lr=1e-2, total_epochs=2)
    resumed = run(tmp_path, epochs=2, lr=4e-2)
    first = ITERATIONS + 1  # the first resumed iteration
    assert sorted(resumed["lrs"]) == list(range(first, 2 * ITERATIONS + 1))
    assert resumed["lrs"][first] == pytest.approx(scheduled_lr(4e-2, first, 2 * ITERATIONS), rel=1e-12)
    assert resumed["lrs"][first] != pytest.approx(scheduled_lr(1e-2, first, 2 * ITERATIONS))
    group = resumed["optimizer"].param_groups[0]
    assert group["initial_lr"] == 4e-2 and resumed["handler"].save_dict["lr_scheduler"].base_lrs == [4e-2]


def test_a_finished_run_says_nothing_was_trained(tmp_path):
    first = run(tmp_path, epochs=2)
    assert first["handler"].nothing_trained is None
    again = run(tmp_path, epochs=2)
    assert again["lrs"] == {}  # not one iteration
    said = again["handler"].nothing_trained
    assert said.startswith(f"already at epoch 2 in {tmp_path / 'last.ckpt'}, nothing trained")
    for name, value in first["network"].state_dict().items():
        assert torch.equal(again["network"].state_dict()[name], value), name


@pytest.mark.parametrize("change", [{"width": 8}, {"dropout": 0.5},
                                    {"extra": {"autoencoder_sha256": "b" * 64, "autoencoder_path": "/x/ae.pt"}}],
                         ids=["network-shape", "network-args-same-shapes", "upstream-file"])
def test_a_resume_of_another_run_is_refused_in_one_line(tmp_path, change):
    run(tmp_path, epochs=1, extra={"autoencoder_sha256": "a" * 64, "roi_size": [32, 32, 32]})
    settings = {"extra": {"autoencoder_sha256": "a" * 64, "roi_size": [32, 32, 32]}, **change}
    with pytest.raises(ValueError) as error:
        run(tmp_path, epochs=2, **settings)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'last.ckpt'}: ") and "\n" not in message
    assert "--resume false" in message and "--output-dir" in message
    assert ("autoencoder_sha256=aaaa" if "extra" in change else f"{next(iter(change))}=") in message
    if "extra" in change:
        assert "(another upstream file: /x/ae.pt)" in message


def test_the_data_split_is_part_of_the_fingerprint(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a_t1.nii.gz").write_bytes(b"1234")
    splits = {"training": [{"case": "a", "t1": str(data / "a_t1.nii.gz")}], "validation": [], "test": []}
    run(tmp_path / "run", epochs=1, splits=splits)
    run(tmp_path / "run", epochs=2, splits=splits)  # the same files: resumes
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["epoch"] == 2
    (data / "a_t1.nii.gz").write_bytes(b"12345")  # replaced in place by another volume
    with pytest.raises(ValueError, match=r"last\.ckpt: it was trained on another data split .*--resume false"):
        run(tmp_path / "run", epochs=3, splits=splits)


def test_an_old_ddp_last_ckpt_resumes(tmp_path):
    """last.ckpt files from torchrun runs before this fix hold ``module.``-prefixed keys and no fingerprint."""
    first = run(tmp_path, epochs=1)
    path = tmp_path / "last.ckpt"
    state = torch.load(path, weights_only=True)
    assert not any(key.startswith("module.") for key in state["network"])  # saved unwrapped
    state["network"] = {f"module.{key}": value for key, value in state["network"].items()}
    state.pop("fingerprint", None)
    torch.save(state, path)
    resumed = run(tmp_path, epochs=1)
    assert resumed["engine"].state.epoch == 1 and resumed["lrs"] == {}
    for name, value in first["network"].state_dict().items():
        assert torch.equal(resumed["network"].state_dict()[name], value), name


def test_resume_false_as_a_flag_word_starts_over(tmp_path):
    run(tmp_path, epochs=2)
    fresh = run(tmp_path, epochs=1, resume="false")  # `--resume false` reaches the bundle as a string
    assert sorted(fresh["lrs"]) == [1, 2, 3]
    assert resume_flag("False") is False and resume_flag("true") is True and resume_flag(1) is True
    with pytest.raises(ValueError, match="resume must be true or false, got 'maybe'"):
        resume_flag("maybe")


def test_a_resumed_run_keeps_its_datalist_and_refuses_another(tmp_path):
    splits = {"training": [{"case": "a", "t1": "/d/a_t1.nii.gz"}, {"case": "b", "t1": "/d/b_t1.nii.gz"}],
              "validation": [{"case": "c", "t1": "/d/c_t1.nii.gz"}], "test": []}
    assert check_resumed_splits(tmp_path, splits) is False  # nothing to resume: the caller writes datalist.json
    (tmp_path / "datalist.json").write_text(json.dumps(splits))
    assert check_resumed_splits(tmp_path, splits) is False  # a datalist but no last.ckpt: a new run
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert check_resumed_splits(tmp_path, splits) is True  # the same split: kept as it is
    assert check_resumed_splits(tmp_path, {**splits, "test": splits["validation"]}, resume="false") is False
    other = {**splits, "validation": [{"case": "d", "t1": "/e/d_t1.nii.gz"}]}
    with pytest.raises(ValueError) as error:
        check_resumed_splits(tmp_path, other)
    message = str(error.value)
    assert message == (f"{tmp_path / 'last.ckpt'}: it was trained on the data split in {tmp_path / 'datalist.json'}, "
                       "and this run's differs (its validation split holds ['c'] where this run's holds ['d']); "
                       "pass --resume false to start a new run there, or choose a new --output-dir")


BUNDLES = sorted(path.parent.parent
                 for path in (Path(__file__).resolve().parents[2] / "bundles").glob("*/configs/train.json"))


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_every_bundle_wires_resume_the_same_way(bundle):
    """What the tests above show for one handler holds in every bundle: the split is written with ``resume`` and
    fingerprinted, and every optimizer and schedule of the config is restored (so its learning rate is re-applied)."""
    config = json.loads((bundle / "configs" / "train.json").read_text())
    assert config["resume"] is True
    assert "datalist=@datalist, resume=@resume" in config["splits"]
    (handler,) = [h for h in config["train"]["handlers"] if h["_target_"].endswith("checkpoint.CheckpointHandler")]
    assert handler["resume"] == "@resume" and handler["splits"] == "@splits"
    stateful = {f"@{key}" for key, value in config.items() if isinstance(value, dict)
                and str(value.get("_target_", "")).startswith(("torch.optim.", "prod9_components.engines.lr_schedule"))}
    assert len(stateful) >= 1 and stateful <= set(handler["save_dict"].values()), stateful
