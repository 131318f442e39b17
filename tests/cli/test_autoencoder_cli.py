"""prod9-train-autoencoder: infer keeps geometry, flag spellings, validate/test, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from prod9_components.cli.argv import normalise_multi_value_flags
from prod9_components.cli.bundle_runner import UsageError, config_files
from tests.helpers import ROOT, cli

pytestmark = pytest.mark.slow


def _odd_volume(path: Path, shape=(33, 41, 25), spacing=2.0) -> nib.Nifti1Image:
    """A smooth blob volume with an oblique-free LPS-style affine and MRI-like intensities (0..~800)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    data = np.where(radius < 0.8, 500 + 300 * np.cos(4 * radius), 0).astype(np.float32)
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:3, 3] = [40.0, 50.0, -20.0]
    image = nib.Nifti1Image(data, affine)
    nib.save(image, path)
    return image


@pytest.mark.parametrize("roi_flag", [["--roi-size", "32", "32", "32"], ["--roi-size", "[32,32,32]"]])
def test_infer_restores_shape_affine_and_intensity_range(stage1_run, tmp_path, roi_flag):
    source = _odd_volume(tmp_path / "odd.nii.gz")
    output = tmp_path / "sub dir" / "recon.nii.gz"  # a path with a space, created on demand
    result = cli("prod9-train-autoencoder", "infer", "--checkpoint", stage1_run["export_path"],
                 "--input", str(tmp_path / "odd.nii.gz"), "--output", str(output), *roi_flag,
                 "--overlap", "0.25", "--sw-batch-size", "2")
    assert f"reconstruction written to {output}" in result.stdout.strip().splitlines()[-1]
    recon = nib.load(output)
    assert recon.shape == source.shape
    np.testing.assert_allclose(recon.affine, source.affine, atol=1e-5)
    data = recon.get_fdata()
    # Intensities are mapped back from [0, 1] to the input's robust range (about 200..800), not left in [0, 1].
    foreground = source.get_fdata() > 0
    assert 100 < np.median(data[foreground]) < 900
    assert np.abs(data[~foreground]).max() < 900


def test_validate_and_test_write_metrics(stage1_run, tmp_path):
    """One file per split (validate must not replace test's scores), and a second run refuses without --overwrite."""
    out = tmp_path / "eval"
    for verb, split in (("validate", "validation"), ("test", "test")):
        result = cli("prod9-train-autoencoder", verb, "--checkpoint", stage1_run["export_path"],
                     "--output-dir", str(out), "--dataset-dir", stage1_run["dataset_dir"])
        metrics = json.loads((out / f"metrics_{split}.json").read_text())
        assert metrics["split"] == split
        assert metrics["checkpoint"] == stage1_run["export_path"]
        assert metrics["psnr"] > 5.0
        assert str(out / f"metrics_{split}.json") in result.stdout.strip().splitlines()[-1]
    assert json.loads((out / "metrics_validation.json").read_text())["split"] == "validation"
    before = (out / "metrics_test.json").read_text()
    result = cli("prod9-train-autoencoder", "test", "--checkpoint", stage1_run["export_path"], "--output-dir",
                 str(out), "--dataset-dir", stage1_run["dataset_dir"], check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"error: {out / 'metrics_test.json'} already exists: pass "
                                                      "--overwrite to replace it, or choose another output")
    assert (out / "metrics_test.json").read_text() == before
    cli("prod9-train-autoencoder", "test", "--checkpoint", stage1_run["export_path"], "--output-dir", str(out),
        "--dataset-dir", stage1_run["dataset_dir"], "--limit-val-batches", "1", "--overwrite")
    assert json.loads((out / "metrics_test.json").read_text())["num_cases"] == 1


def test_infer_never_replaces_its_input_and_asks_before_replacing_an_output(stage1_run, tmp_path):
    source = tmp_path / "odd.nii.gz"
    _odd_volume(source)
    before = source.read_bytes()
    for extra in ([], ["--overwrite"]):  # the input: never, even with --overwrite
        result = cli("prod9-train-autoencoder", "infer", "--checkpoint", stage1_run["export_path"], "--input",
                     str(source), "--output", str(source), *extra, check=False)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == (f"error: output {source} is the input {source}: choose "
                                                          "another output (never overwritten)")
    assert source.read_bytes() == before
    earlier = tmp_path / "recon.nii.gz"
    earlier.write_bytes(b"an earlier reconstruction")
    args = ["infer", "--checkpoint", stage1_run["export_path"], "--input", str(source), "--output", str(earlier),
            "--roi-size", "32", "32", "32"]
    result = cli("prod9-train-autoencoder", *args, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: {earlier} already exists: pass --overwrite to replace it, or choose another output")
    assert earlier.read_bytes() == b"an earlier reconstruction"
    cli("prod9-train-autoencoder", *args, "--overwrite")
    assert nib.load(earlier).shape == nib.load(source).shape


def test_default_config_rebuilds_a_tiny_checkpoint(stage1_run, tmp_path):
    """The stage's default (large) config evaluates a tiny checkpoint: the network comes from the file."""
    record = torch.load(stage1_run["export_path"], weights_only=True)
    assert record["network_args"]["num_channels"] != [64, 128, 256]
    cli("prod9-train-autoencoder", "test", "--checkpoint", stage1_run["export_path"], "--output-dir",
        str(tmp_path), "--dataset-dir", stage1_run["dataset_dir"], "--limit-val-batches", "1",
        "--num-workers", "0", "--roi-size", "32", "32", "32")


def test_missing_dataset_dir_is_one_line_error(tmp_path):
    result = cli("prod9-train-autoencoder", "train", "--dataset-dir", str(tmp_path / "nowhere"), "--output-dir",
                 str(tmp_path / "out"), check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "nowhere" in lines[-1]
    assert "Traceback" not in result.stderr


def test_checkpoint_that_is_not_a_torch_file(tmp_path, stage1_run):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    result = cli("prod9-train-autoencoder", "infer", "--checkpoint", str(bad), "--input",
                 str(_odd_volume(tmp_path / "x.nii.gz") and tmp_path / "x.nii.gz"), "--output",
                 str(tmp_path / "y.nii.gz"), check=False)
    assert result.returncode != 0
    assert "bad.ckpt" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "y.nii.gz").exists()


def test_export_with_other_levels_is_refused(stage1_run, tmp_path):
    record = torch.load(stage1_run["export_path"], weights_only=True)
    record["network_args"]["levels"] = [8, 5, 5, 5]
    other = tmp_path / "other_levels.pt"
    torch.save(record, other)
    result = cli("prod9-train-autoencoder", "test", "--checkpoint", str(other), "--output-dir",
                 str(tmp_path / "eval"), "--dataset-dir", stage1_run["dataset_dir"], check=False)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert "levels" in line and "[8, 5, 5, 5]" in line


def test_config_resolution(tmp_path):
    bundle, files = config_files("maskgit_stage1", "validate")
    assert bundle.resolve() == (ROOT / "bundles" / "maskgit_stage1").resolve()  # bundles/ links to the package's
    assert [Path(f).name for f in files] == ["train.json", "evaluate.json"]
    tiny = ROOT / "bundles" / "maskgit_stage1" / "configs" / "tiny.json"
    _, files = config_files("maskgit_stage1", "train", str(tiny))
    assert [Path(f).name for f in files] == ["train.json", "tiny.json"]
    _, files = config_files("maskgit_stage1", "infer")  # the commands' layered config, not the standalone one
    assert [Path(f).name for f in files] == ["train.json", "checkpoint_inference.json"]
    with pytest.raises(UsageError, match="standalone model-zoo config"):
        config_files("maskgit_stage1", "infer", str(tiny.parent / "inference.json"))


def test_both_multi_value_spellings_normalise_the_same():
    assert normalise_multi_value_flags(["infer", "--roi-size", "64", "64", "64", "--overlap", "0.5"]) == \
        normalise_multi_value_flags(["infer", "--roi-size", "[64,64,64]", "--overlap", "0.5"])


@pytest.mark.parametrize("command, flag", [(["prod9-train-autoencoder", "infer"], "--input"),
                                           (["prod9-train-transformer", "generate"], "--input"),
                                           (["prod9-train-maskgit-controlnet", "generate"], "--mask"),
                                           (["prod9-train-maisi-controlnet", "generate"], "--source")])
def test_help_prints_flags_and_runs_nothing(command, flag):
    result = cli(*command, "--help")
    text = result.stdout + result.stderr
    assert flag in text and "--checkpoint" in text
    assert "error:" not in text and "parsing config_file" not in text


def test_infer_reads_big_endian_files_with_a_trailing_singleton_axis(stage1_run, tmp_path):
    """A big-endian (X, Y, Z, 1) file, as some scanners and tools write them, reconstructs exactly like the plain
    little-endian 3D file (infer used to stop at "given numpy array has byte order different from the native byte
    order"), and the one-line error of a truncated gzip names the file, not just zlib's complaint."""
    plain = _odd_volume(tmp_path / "plain.nii.gz")
    data = np.asarray(plain.dataobj)[..., None].astype(">f4")
    nib.save(nib.Nifti1Image(data, plain.affine, header=nib.Nifti1Header().as_byteswapped(">")),
             str(tmp_path / "scanner.nii.gz"))
    assert nib.load(tmp_path / "scanner.nii.gz").header.endianness == ">"
    for name in ("plain", "scanner"):
        cli("prod9-train-autoencoder", "infer", "--checkpoint", stage1_run["export_path"], "--input",
            str(tmp_path / f"{name}.nii.gz"), "--output", str(tmp_path / f"{name}_recon.nii.gz"), "--roi-size", "32",
            "32", "32")
    recon = nib.load(tmp_path / "scanner_recon.nii.gz")
    assert recon.shape == plain.shape
    np.testing.assert_allclose(recon.affine, plain.affine, atol=1e-5)
    np.testing.assert_allclose(recon.get_fdata(), nib.load(tmp_path / "plain_recon.nii.gz").get_fdata(), atol=1e-3)

    whole = (tmp_path / "plain.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    result = cli("prod9-train-autoencoder", "infer", "--checkpoint", stage1_run["export_path"], "--input",
                 str(tmp_path / "cut.nii.gz"), "--output", str(tmp_path / "cut_recon.nii.gz"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'cut.nii.gz'}: cannot read (")
