"""Stage links: an export is hashed and loaded from one read of its bytes, a changed one is named with the checkpoint
that recorded it, and the default export lives in its run's output_dir where stage 2 reads it (the resume refusal of
another export: tests/unit/test_resume_checkpoint.py)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from prod9_components.data.case_cache import check_sha256
from prod9_components.networks import export
from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream


def _tiny_network() -> TransformerDecoderSingleStream:
    """A registered network class (records name only those), small enough to save in milliseconds."""
    return TransformerDecoderSingleStream(codebook_size=8, hidden_dim=16, num_layers=1, num_heads=2,
                                          max_grid_size=(2, 2, 2))


def _record(epoch: int) -> dict:
    return export.network_record(_tiny_network(), epoch=epoch)


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


STAGE1_EXPORTS = {  # stage-1 bundle -> (default output_dir, export file name, the stage-2 bundles reading it, its id)
    "maskgit_stage1": ("outputs/maskgit_stage1", "brats_autoencoder-large.pt",
                       ("maskgit_stage2_label", "maskgit_stage2_incontext"), "autoencoder_path"),
    "maisi_stage1_vae": ("outputs/maisi_stage1", "maisi_vae_final.pt", ("maisi_stage2_diffusion",), "vae_path"),
}


def _parsed(bundle: str, key: str, **overrides):
    from monai.bundle import ConfigParser

    from tests.helpers import ROOT

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
