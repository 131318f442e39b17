"""prod9-train-transformer: generate reproducibility, shapes, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import cli

pytestmark = pytest.mark.slow
CMD = "prod9-train-transformer"


def _source(stage2_runs) -> str:
    return str(sorted(Path(stage2_runs["dataset_dir"]).glob("*/*_t1.nii.gz"))[0])


def test_translation_is_reproducible_and_keeps_source_geometry(stage2_runs, tmp_path):
    ckpt = str(Path(stage2_runs["incontext"]) / "best.ckpt")
    outputs = []
    for name in ("a.nii.gz", "b.nii.gz"):
        result = cli(CMD, "generate", "--checkpoint", ckpt, "--input", _source(stage2_runs), "--output",
                     str(tmp_path / name), "--num-inference-steps", "3", "--seed", "7")
        assert result.stdout.strip().splitlines()[-1] == f"generated volume written to {tmp_path / name}"
        outputs.append(nib.load(tmp_path / name))
    np.testing.assert_array_equal(outputs[0].get_fdata(), outputs[1].get_fdata())
    source = nib.load(_source(stage2_runs))
    assert outputs[0].shape == source.shape
    np.testing.assert_allclose(outputs[0].affine, source.affine, atol=1e-5)


def test_source_of_another_shape_comes_back_in_its_own_shape(stage2_runs, tmp_path):
    """A 2 mm volume of odd shape: padded/cropped on the token grid, restored on output."""
    data = np.zeros((61, 53, 47), np.float32)
    data[10:50, 8:45, 6:40] = np.random.default_rng(0).uniform(100, 900, (40, 37, 34))
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "odd.nii.gz")
    ckpt = str(Path(stage2_runs["incontext"]) / "best.ckpt")
    cli(CMD, "generate", "--checkpoint", ckpt, "--input", str(tmp_path / "odd.nii.gz"), "--output",
        str(tmp_path / "out.nii.gz"), "--num-inference-steps", "2")
    out = nib.load(tmp_path / "out.nii.gz")
    assert out.shape == (61, 53, 47)
    np.testing.assert_allclose(out.affine, np.diag([2.0, 2.0, 2.0, 1.0]), atol=1e-5)


def test_label_samples_are_seeded(stage2_runs, tmp_path):
    ckpt = str(Path(stage2_runs["label"]) / "best.ckpt")
    for run in ("one", "two"):
        cli(CMD, "generate", "--checkpoint", ckpt, "--modality", "t2w", "--num-samples", "1", "--num-inference-steps", "3",
            "--output", str(tmp_path / run), "--sample-size", "32", "32", "32")
    a, b = (nib.load(tmp_path / run / "sample_0001_T2.nii.gz").get_fdata() for run in ("one", "two"))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 32, 32)
    # --roi-size is the decoding window (the seed's meaning), not the sample's size: the same tokens decoded in
    # 16^3 windows (GroupNorm statistics per tile) give another image of the same size; 32^3 (the export's) the same.
    for roi, same in (("32", True), ("16", False)):
        cli(CMD, "generate", "--checkpoint", ckpt, "--modality", "t2w", "--num-samples", "1", "--num-steps", "3",
            "--output", str(tmp_path / roi), "--sample-size", "32", "32", "32", "--roi-size", roi, roi, roi)
        image = nib.load(tmp_path / roi / "sample_0001_T2.nii.gz").get_fdata()
        assert image.shape == (32, 32, 32) and (np.abs(image - a).max() == 0) == same
    # A third run into "one" would replace its sample: refused, naming the file and --overwrite.
    result = cli(CMD, "generate", "--checkpoint", ckpt, "--modality", "t2w", "--num-samples", "1", "--num-inference-steps", "3",
                 "--output", str(tmp_path / "one"), "--sample-size", "32", "32", "32", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'one' / 'sample_0001_T2.nii.gz'} already exists: pass --overwrite to replace it, or "
        "choose another output")
    np.testing.assert_array_equal(nib.load(tmp_path / "one" / "sample_0001_T2.nii.gz").get_fdata(), a)


def test_translation_never_replaces_its_source(stage2_runs, tmp_path):
    source = tmp_path / "t1.nii.gz"
    source.write_bytes(Path(_source(stage2_runs)).read_bytes())
    before = source.read_bytes()
    result = cli(CMD, "generate", "--checkpoint", str(Path(stage2_runs["incontext"]) / "best.ckpt"), "--input",
                 str(source), "--output", str(source), "--overwrite", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"error: output {source} is the input {source}: choose another "
                                                      "output (never overwritten)")
    assert source.read_bytes() == before


@pytest.mark.parametrize("args, expected", [
    (["--modality", "Flare"], "unknown modality 'Flare'"),
    (["--modality", "T1", "--num-inference-steps", "0"], "num_inference_steps must be >= 1"),
])
def test_label_generate_bad_input(stage2_runs, tmp_path, args, expected):
    ckpt = str(Path(stage2_runs["label"]) / "best.ckpt")
    result = cli(CMD, "generate", "--checkpoint", ckpt, "--output", str(tmp_path / "gen"), *args, check=False)
    assert result.returncode != 0
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "gen").exists() or not any((tmp_path / "gen").iterdir())


def test_same_source_and_target_is_refused(stage2_runs, tmp_path):
    ckpt = str(Path(stage2_runs["incontext"]) / "best.ckpt")
    result = cli(CMD, "generate", "--checkpoint", ckpt, "--input", _source(stage2_runs), "--output",
                 str(tmp_path / "x.nii.gz"), "--target-modality", "T1", check=False)
    assert result.returncode != 0
    assert "T1 is both a source and the target modality" in result.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def test_export_with_another_vocabulary_is_refused(stage2_runs, tmp_path):
    """Evaluating a transformer with a stage-1 export other than the one it was trained on."""
    record = torch.load(stage2_runs["autoencoder_path"], weights_only=True)
    record["network_args"]["levels"] = [8, 8, 8, 5, 5]
    other = tmp_path / "other.pt"
    torch.save(record, other)
    result = cli(CMD, "test", "--checkpoint", str(Path(stage2_runs["label"]) / "best.ckpt"), "--autoencoder-path",
                 str(other), "--output-dir", str(tmp_path / "out"), "--dataset-dir", stage2_runs["dataset_dir"],
                 check=False)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert "other.pt" in line and f"changed since {Path(stage2_runs['label']) / 'best.ckpt'} was trained" in line
    assert not (tmp_path / "out" / "metrics_test.json").exists()


def test_stage1_checkpoint_is_not_a_transformer(stage2_runs, tmp_path):
    result = cli(CMD, "test", "--checkpoint", stage2_runs["autoencoder_path"], check=False)
    assert result.returncode != 0
    assert "not a stage-2 transformer" in result.stderr.strip().splitlines()[-1]


def test_incontext_num_samples_and_no_sample_size(stage2_runs, tmp_path):
    """The seed's `generate --num-samples N --source-modality T1 --target-modality T2 --output DIR`: N translations
    (here N samples of one --input, seeds seed + i), each on the source's grid; a translation has no --sample-size."""
    ckpt = str(Path(stage2_runs["incontext"]) / "best.ckpt")
    source = _source(stage2_runs)
    result = cli(CMD, "generate", "--checkpoint", ckpt, "--input", source, "--num-samples", "2", "--num-steps", "2",
                 "--source-modality", "T1", "--target-modality", "T2", "--output", str(tmp_path / "gen"))
    case = Path(source).name.split(".nii")[0]
    names = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert names == [f"{case}_sample_0001_T2.nii.gz", f"{case}_sample_0002_T2.nii.gz"], result.stdout
    a, b = (nib.load(tmp_path / "gen" / n) for n in names)
    assert a.shape == b.shape == nib.load(source).shape and np.abs(a.get_fdata() - b.get_fdata()).max() > 0
    result = cli(CMD, "generate", "--checkpoint", ckpt, "--sample-size", "32", "32", "32", "--output",
                 str(tmp_path / "x"), check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --sample-size is for label-conditional checkpoints; a translation has the size of its --input")
