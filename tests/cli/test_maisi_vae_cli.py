"""prod9-train-maisi-vae: --help, test writes metrics, one-line errors for files that are not a MAISI VAE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, cli

pytestmark = pytest.mark.slow

TINY = str(ROOT / "bundles" / "maisi_stage1_vae" / "configs" / "tiny.json")


def test_help_lists_the_verbs_and_the_bundle_defaults():
    result = cli("prod9-train-maisi-vae", "--help")
    text = result.stdout + result.stderr
    for verb in ("train", "validate", "test", "infer"):
        assert f"\n     {verb}\n" in text, verb
    assert "maisi_stage1_vae" in text
    train = cli("prod9-train-maisi-vae", "train", "--help")
    text = train.stdout + train.stderr  # fire prints help on stderr when not on a terminal
    assert "export (<output_dir>/maisi_vae_final.pt)" in text and "(default outputs/maisi_stage1)" in text
    assert "maskgit" not in text and "brats_autoencoder" not in text
    infer = cli("prod9-train-maisi-vae", "infer", "--help")
    text = infer.stdout + infer.stderr
    assert "--input" in text and "--checkpoint" in text and "--roi_size" in text
    assert "error:" not in text


def test_test_verb_writes_metrics(maisi_vae_run, tmp_path):
    checkpoint = str(Path(maisi_vae_run["output_dir"]) / "best.ckpt")
    result = cli("prod9-train-maisi-vae", "test", "--checkpoint", checkpoint, "--config", TINY,
                 "--output-dir", str(tmp_path), "--dataset-dir", maisi_vae_run["dataset_dir"],
                 "--roi-size", "32", "32", "32", "--limit-val-batches", "1")
    metrics = json.loads((tmp_path / "metrics_test.json").read_text())
    assert metrics["split"] == "test" and metrics["checkpoint"] == checkpoint and metrics["num_cases"] == 1
    assert 5.0 < metrics["psnr"] < 60.0 and 0.0 < metrics["ms_ssim"] <= 1.0
    assert result.stdout.strip().splitlines()[-1] == \
        f"test metrics of {checkpoint} written to {tmp_path / 'metrics_test.json'}"


@pytest.mark.parametrize("kind", ["maskgit_stage1", "latent_channels"])
def test_a_file_that_is_not_this_vae_is_one_line_error(maisi_vae_run, tmp_path, kind):
    """A record of another stage, or a VAE with other latent channels (a non-torch file: test_autoencoder_cli)."""
    bad = tmp_path / "bad.pt"
    record = torch.load(maisi_vae_run["export_path"], weights_only=True)
    if kind == "maskgit_stage1":
        record["stage"] = "maskgit_stage1"
        expected = "a 'maskgit_stage1' checkpoint, expected one of maisi_stage1_vae"
    else:
        record["network_args"]["latent_channels"] = 8
        expected = "network argument 'latent_channels' is 8 but the config expects 4"
    torch.save(record, bad)
    result = cli("prod9-train-maisi-vae", "test", "--checkpoint", str(bad), "--config", TINY,
                 "--output-dir", str(tmp_path / "eval"), "--dataset-dir", maisi_vae_run["dataset_dir"],
                 check=False)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(bad) in line and expected in line, line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "eval" / "metrics_test.json").exists()


def test_missing_input_is_one_line_error(tmp_path):
    result = cli("prod9-train-maisi-vae", "infer", "--input", str(tmp_path / "missing.nii.gz"), "--output",
                 str(tmp_path / "out.nii.gz"), check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: --input {tmp_path / 'missing.nii.gz'}: no such file"
    assert not (tmp_path / "out.nii.gz").exists()
