"""Every console script refuses a checkpoint that is not a torch file, and one whose pickle would run code, with a
one-line error naming the file (exit status 2, no traceback), before anything is written."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import cli

# console script -> (an evaluation verb, a generation verb)
VERBS = {
    "prod9-train-autoencoder": ("test", "infer"),
    "prod9-train-transformer": ("validate", "generate"),
    "prod9-train-maskgit-controlnet": ("test", "generate"),
    "prod9-train-maisi-vae": ("validate", "infer"),
    "prod9-train-maisi-diffusion": ("test", "generate"),
    "prod9-train-maisi-controlnet": ("validate", "generate"),
}


class RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint would do (with worse code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad checkpoints")  # a space in the path, too
    (root / "notes.ckpt").write_text("not a checkpoint\n")
    torch.save({"state_dict": RunsCode(str(root / "pwned")), "format": "prod9-network-record"}, root / "evil.ckpt")
    return {"not_torch": root / "notes.ckpt", "evil": root / "evil.ckpt", "marker": root / "pwned"}


@pytest.mark.parametrize("command", VERBS)
@pytest.mark.parametrize("fault", ["not_torch", "evil"])
def test_bad_checkpoint_is_one_clear_line(command, fault, bad_files, demo_dataset_dir, tmp_path):
    verb = VERBS[command][0 if fault == "not_torch" else 1]
    out = tmp_path / "out"
    result = cli(command, verb, "--checkpoint", str(bad_files[fault]), "--output-dir", str(out),
                 "--dataset-dir", demo_dataset_dir, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines and lines[-1].startswith("error: "), result.stderr
    assert f"{bad_files[fault]}: not a loadable prod9 checkpoint" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not bad_files["marker"].exists()  # weights_only loading never ran the pickle's code
    assert not out.exists() or not any(out.rglob("*.ckpt"))


def test_a_record_naming_a_function_is_refused_by_the_cli(tmp_path):
    """A well-formed record whose ``network_target`` is MONAI's ``instantiate`` (it would call ``open``) given as the
    stage-1 export a transformer trains on: one line naming the file, nothing run, nothing written."""
    from prod9_components.networks.export import atomic_save
    from tests.unit.test_network_registry import hostile_record

    evil, marker, out = tmp_path / "evil.pt", tmp_path / "PWNED", tmp_path / "out"
    atomic_save(hostile_record(marker), evil)
    result = cli("prod9-train-transformer", "train", "--autoencoder-path", str(evil), "--output-dir", str(out),
                 "--dataset-dir", str(tmp_path / "no data"), check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {evil}: refusing to build network_target 'monai.utils.module.instantiate': not one of the project's "
        "network classes (AutoencoderFSQ, MaisiVAE, TransformerDecoderSingleStream, MaskGiTControlNet, "
        "MaisiDiffusionUNet, MaisiControlNet)"], result.stderr
    assert not marker.exists()
    assert not out.exists() or not any(out.rglob("*.ckpt"))
