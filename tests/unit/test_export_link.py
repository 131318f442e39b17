"""Stage links: an export is hashed and loaded from one read of its bytes; a run's last.ckpt records the export it
trains on, and resuming on another one is refused with one line naming both files."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from ignite.engine import Engine
from torch import nn

from prod9_components.data.case_cache import check_sha256
from prod9_components.handlers.checkpoint import CheckpointHandler
from prod9_components.handlers.export_link import ExportLink
from prod9_components.networks import export


def _record(epoch: int) -> dict:
    return export.network_record(nn.Linear(2, 2), network_args={"in_features": 2, "out_features": 2}, epoch=epoch)


def test_an_export_is_hashed_and_loaded_from_the_same_bytes(tmp_path, monkeypatch):
    """The export is replaced between the moment it is hashed and the moment it is loaded (a stage 1 writing its
    next best export): the record and its sha256 must still describe one file."""
    path, newer = tmp_path / "autoencoder.pt", tmp_path / "newer.pt"
    export.atomic_save(_record(1), path)
    export.atomic_save(_record(2), newer)
    old_bytes = path.read_bytes()
    real_load = torch.load

    def replaced_then_loaded(f, *args, **kwargs):
        newer.replace(path)  # the export is swapped for another one mid-read
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", replaced_then_loaded)
    record, sha256 = export.read_record(path)
    assert record["epoch"] == 1 and sha256 == hashlib.sha256(old_bytes).hexdigest()


def test_a_stage_link_that_changed_names_the_file_and_the_checkpoint(tmp_path):
    path = tmp_path / "autoencoder.pt"
    export.atomic_save(_record(1), path)
    record, sha256 = export.read_record(path)
    assert check_sha256(path, sha256, "stage-1 export", actual=sha256) == sha256
    with pytest.raises(ValueError, match=rf"^{path}: this stage-1 export changed since {tmp_path}/best.ckpt was "
                                         r"trained on it \(sha256 .*\); pass the export it was trained on$"):
        check_sha256(path, "0" * 64, "stage-1 export", actual=sha256, recorded_by=tmp_path / "best.ckpt")


def _train(output_dir, link: ExportLink, epochs: int) -> None:
    """Train a do-nothing engine to ``epochs`` with a CheckpointHandler that resumes from ``output_dir``."""
    handler = CheckpointHandler(str(output_dir), nn.Linear(2, 2), {"stage1_export": link}, resume=True)
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    engine.run([0], max_epochs=epochs)


def test_last_ckpt_records_the_export_and_a_resume_on_another_one_is_refused(tmp_path):
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    for path, epoch in ((first, 1), (second, 2)):
        export.atomic_save(_record(epoch), path)
    _, sha_first = export.read_record(first)
    _, sha_second = export.read_record(second)
    out = tmp_path / "run"
    _train(out, ExportLink(first, sha_first, "stage-1 export"), epochs=1)
    last = torch.load(out / "last.ckpt", weights_only=True)
    assert last["stage1_export"] == {"path": str(first), "sha256": sha_first}

    with pytest.raises(ValueError, match=rf"^{second}: this stage-1 export \(sha256 {sha_second[:12]}…\) is not the "
                                         rf"one the run being resumed was trained on, {first} \(sha256 "
                                         rf"{sha_first[:12]}…\); pass that file, or start a new run"):
        _train(out, ExportLink(second, sha_second, "stage-1 export"), epochs=2)
    _train(out, ExportLink(first, sha_first, "stage-1 export"), epochs=2)  # the same export resumes
    assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == 2


STAGE1_EXPORTS = {  # stage-1 bundle -> (default output_dir, export file name, the stage-2 bundles reading it, its id)
    "maskgit_stage1": ("outputs/maskgit_stage1", "brats_autoencoder-large.pt",
                       ("maskgit_stage2_label", "maskgit_stage2_incontext"), "autoencoder_path"),
    "maisi_stage1_vae": ("outputs/maisi_stage1", "maisi_vae_final.pt", ("maisi_stage2_diffusion",), "vae_path"),
}


def _parsed(bundle: str, key: str, **overrides):
    from monai.bundle import ConfigParser

    from tests.stage1_helpers import ROOT

    parser = ConfigParser(globals={"os": "os"})
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    for name, value in overrides.items():
        parser[name] = value
    return parser.get_parsed_content(key)


@pytest.mark.parametrize("stage1", sorted(STAGE1_EXPORTS))
def test_the_default_export_lives_in_the_runs_output_dir_where_stage_2_reads_it(stage1):
    """A stage-1 run writes nothing outside the output_dir it was given: its export defaults to a file in it, and the
    stage-2 bundles read that file by default (a seed-style explicit --export-path / --autoencoder-path still works:
    both are ordinary ids)."""
    output_dir, name, readers, link_id = STAGE1_EXPORTS[stage1]
    assert _parsed(stage1, "export_path") == os.path.join(output_dir, name)
    assert _parsed(stage1, "export_path", output_dir="runs/a") == os.path.join("runs/a", name)
    assert _parsed(stage1, "export_path", export_path="outputs/elsewhere.pt") == "outputs/elsewhere.pt"
    for reader in readers:
        assert _parsed(reader, link_id) == os.path.join(output_dir, name)
