"""MaskGiT stage 3 (ControlNet) through `python -m monai.bundle run` and its CLI: chained on the stage-2 label
transformer the test session trained on its own stage-1 export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from prod9_components.metrics.tumour import CONTROL_METRICS, SEGMENTATION_METRICS
from tests.helpers import MASKGIT_CONTROLNET, bundle_run, cli

pytestmark = pytest.mark.slow
CMD = "prod9-train-maskgit-controlnet"


def _ids(runs: dict, out: Path) -> dict:
    """The run's ids; one tumour-segmenter cache for every evaluation of the module (trained once, then reused)."""
    return {"dataset_dir": runs["dataset_dir"], "output_dir": out, "token_cache_dir": runs["token_cache_dir"],
            "segmenter_cache_dir": Path(runs["token_cache_dir"]).parent / "segmenter_cache"}


@pytest.fixture(scope="module")
def stage3_run(stage2_runs, tmp_path_factory) -> dict:
    """A tiny ControlNet (control_type mask+label, its mask encoder 16 wide as in the demo) on the label transformer."""
    out = tmp_path_factory.mktemp("maskgit_stage3")
    bundle_run(MASKGIT_CONTROLNET, ["train.json", "tiny.json"], {
        **_ids(stage2_runs, out), "transformer_path": Path(stage2_runs["label"]) / "best.ckpt",
        "control_type": "mask+label", "encoder_channels": 16,
        "sample_during_validation": False})  # evaluate.json samples below
    return {**stage2_runs, "stage3": out}


def test_chain_train_evaluate_generate(stage3_run):
    out = stage3_run["stage3"]
    record = torch.load(out / "best.ckpt", weights_only=True)
    assert record["stage"] == "maskgit_stage3_controlnet" and record["network_args"]["control_type"] == "mask+label"
    assert record["network_args"]["encoder_channels"] == 16  # the bundle id reaches the network (and its record)
    assert record["transformer_path"] == str(Path(stage3_run["label"]) / "best.ckpt")
    # The frozen base inside the record is the stage-2 transformer, bit for bit.
    base = torch.load(record["transformer_path"], weights_only=True)["state_dict"]
    for name, value in base.items():
        assert torch.equal(record["state_dict"][f"base.{name}"], value), name

    # two samples per case and modality for the segmenter (the bundle id through evaluate.json)
    bundle_run(MASKGIT_CONTROLNET, ["train.json", "tiny.json", "evaluate.json"], {
        **_ids(stage3_run, out), "split": "test", "num_inference_steps": 3, "segmentation_samples": 2})
    metrics = json.loads((out / "metrics_test.json").read_text())
    assert metrics["num_cases"] == 1 and metrics["control_type"] == "mask+label"
    assert set(CONTROL_METRICS) <= set(metrics) and metrics["val_loss"] > 0
    assert metrics["real_contrast_enhancing"] > 0.05  # the demo's enhancing rim is bright on the real images
    # Segment-the-synthetic: the segmenter trained on the real training images finds the real test tumour, and its
    # Dice on the mask-steered samples is reported beside that, with their ratio.
    seg_scores = (*SEGMENTATION_METRICS, "seg_dice_ratio")
    assert all(math.isfinite(metrics[k]) for k in seg_scores), {k: metrics.get(k) for k in seg_scores}
    assert 0 <= metrics["seg_dice_generated"] <= 1 and 0 < metrics["seg_dice_real"] <= 1
    assert metrics["seg_dice_ratio"] == pytest.approx(metrics["seg_dice_generated"] / metrics["seg_dice_real"])
    segmenter_dir = Path(metrics["segmenter_dir"])
    assert segmenter_dir.parent == _ids(stage3_run, out)["segmenter_cache_dir"]
    own = json.loads((segmenter_dir / "metrics.json").read_text())  # its own real test Dice, beside its weights
    assert own["num_test_volumes"] == 4 and 0 < own["dice_test"] <= 1  # 1 test case x 4 modalities
    # The evaluator's real images are the ones the segmenter was tested on (the same case, preprocessing and all four
    # modalities as targets): the two Dice agree up to the grid's padding.
    assert metrics["seg_dice_real"] == pytest.approx(own["dice_test"], abs=0.05)

    bundle_run(MASKGIT_CONTROLNET, ["train.json", "checkpoint_inference.json"],
               {**_ids(stage3_run, out), "num_inference_steps": 3, "modality": "FLAIR"})
    image, mask = (nib.load(p) for p in sorted((out / "generated").glob("*.nii.gz")))
    assert image.get_filename().endswith("_FLAIR.nii.gz") and mask.get_filename().endswith("_mask.nii.gz")
    assert image.shape == mask.shape == tuple(4 * g for g in record["volume_grid"])
    np.testing.assert_allclose(image.affine, mask.affine)
    assert set(np.unique(mask.get_fdata())) <= {0, 1, 2, 3} and mask.get_fdata().max() > 0


def test_trained_branch_makes_the_mask_matter(stage3_run, tmp_path):
    """The control-sensitivity score (change inside the tumour minus change in the healthy brain, the same seed
    with the case's mask vs an empty one) of a briefly trained branch beats the untrained branch's, which is exactly
    0: a new branch adds nothing (test_maskgit_controlnet.py: the output equals the base's at initialisation) and
    identical samples score 0 (test_tumour_metrics.py)."""
    # lr 1e-3 (tiny.json's): the change inside the mask is 4.0x the change outside on this tiny chain (one thread;
    # 20 epochs: 2.6x, 15: 2.5x); at 3e-3 the branch also moved the healthy brain (1.8x one thread, 2.4x two).
    out = tmp_path / "trained"
    bundle_run(MASKGIT_CONTROLNET, ["train.json", "tiny.json"], {
        **_ids(stage3_run, out), "transformer_path": Path(stage3_run["label"]) / "best.ckpt",
        "control_type": "mask", "epochs": 30, "val_interval": 30, "sample_during_validation": False})
    bundle_run(MASKGIT_CONTROLNET, ["train.json", "tiny.json", "evaluate.json"], {
        **_ids(stage3_run, out), "split": "test", "num_inference_steps": 4})
    trained = json.loads((out / "metrics_test.json").read_text())
    assert trained["sensitivity"] > 0.003 and trained["change_inside"] > 2 * trained["change_outside"]


def test_generate_from_a_user_mask_on_another_grid(stage3_run, tmp_path):
    """A BraTS 2021 mask (label 4) at 2 mm and of odd shape: mapped to 0..3, resampled nearest onto the grid."""
    seg = np.zeros((61, 57, 45), np.uint8)
    seg[20:40, 20:38, 15:30] = 2
    seg[25:35, 24:34, 18:27] = 4
    seg[28:32, 27:31, 21:24] = 1
    nib.save(nib.Nifti1Image(seg, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "case_seg.nii.gz")
    result = cli(CMD, "generate", "--checkpoint", str(stage3_run["stage3"] / "best.ckpt"), "--mask",
                 str(tmp_path / "case_seg.nii.gz"), "--modality", "T1ce", "--output", str(tmp_path / "out"),
                 "--num-inference-steps", "2")
    assert result.stdout.strip().splitlines()[-1] == (f"mask-controlled samples: 2 file(s) written to {tmp_path / 'out'}"
                                                      " (case_seg_T1ce.nii.gz ... case_seg_mask.nii.gz)")
    mask = nib.load(tmp_path / "out" / "case_seg_mask.nii.gz").get_fdata()
    assert (tmp_path / "out" / "case_seg_T1ce.nii.gz").is_file()
    assert sorted(np.unique(mask)) == [0, 1, 2, 3]
    # 2 mm -> 4 mm halves each side: the oedema box (20x18x15 voxels) keeps its volume in mm^3.
    assert (mask > 0).sum() * 4**3 == pytest.approx((seg > 0).sum() * 2**3, rel=0.15)


def test_generate_conditioning_scale_zero_is_the_transformer_alone(stage3_run, tmp_path):
    """``generate --conditioning-scale 0``: the branch adds nothing, so a tumour mask and an empty mask give the same
    sample from the same seed; amplified 50x, the suite's briefly trained branch changes the sample (at 1 it is too
    weak to flip a sampled token here). `--seed 1` draws another sample."""
    seg = np.zeros((32, 32, 32), np.uint8)
    seg[8:24, 8:24, 8:24] = 2
    seg[12:20, 12:20, 12:20] = 3
    for name, data in (("tumour", seg), ("empty", np.zeros_like(seg))):
        nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), tmp_path / f"{name}.nii.gz")
    volumes = {}
    for scale in ("0", "50"):
        for name in ("tumour", "empty"):
            out = tmp_path / f"{name}_{scale}.nii.gz"
            cli(CMD, "generate", "--checkpoint", str(stage3_run["stage3"] / "best.ckpt"), "--mask",
                str(tmp_path / f"{name}.nii.gz"), "--modality", "T1", "--num-inference-steps", "2",
                "--conditioning-scale", scale, "--output", str(out))
            volumes[name, scale] = nib.load(out).get_fdata()
    assert np.array_equal(volumes["tumour", "0"], volumes["empty", "0"])
    assert np.abs(volumes["tumour", "50"] - volumes["empty", "50"]).max() > 1e-3
    out = tmp_path / "tumour_0_seed1.nii.gz"  # --seed: another draw (the default is seed 0)
    cli(CMD, "generate", "--checkpoint", str(stage3_run["stage3"] / "best.ckpt"), "--mask",
        str(tmp_path / "tumour.nii.gz"), "--modality", "T1", "--num-inference-steps", "2", "--conditioning-scale", "0",
        "--seed", "1", "--output", str(out))
    assert np.abs(nib.load(out).get_fdata() - volumes["tumour", "0"]).max() > 1e-3


def test_generate_never_replaces_its_mask_or_earlier_samples(stage3_run, tmp_path):
    """``--output x.nii.gz`` writes the mask used beside it as ``x_mask.nii.gz``: when that is the --mask given, it is
    refused even with --overwrite; an existing sample is refused without --overwrite. Nothing is written."""
    seg = np.zeros((16, 16, 16), np.uint8)
    seg[4:10, 4:10, 4:10] = 2
    given = tmp_path / "x_mask.nii.gz"
    nib.save(nib.Nifti1Image(seg, np.eye(4)), given)
    before = given.read_bytes()
    checkpoint = str(stage3_run["stage3"] / "best.ckpt")
    result = cli(CMD, "generate", "--checkpoint", checkpoint, "--mask", str(given), "--modality", "T1",
                 "--output", str(tmp_path / "x.nii.gz"), "--overwrite", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"error: output {given} is the input {given}: choose another "
                                                      "output (never overwritten)")
    assert given.read_bytes() == before and not (tmp_path / "x.nii.gz").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x_mask_T1.nii.gz").write_bytes(b"earlier sample")
    result = cli(CMD, "generate", "--checkpoint", checkpoint, "--mask", str(given), "--modality", "T1",
                 "--output", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "x_mask_T1.nii.gz already exists: pass --overwrite" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_mask_T1.nii.gz"]


@pytest.mark.parametrize("make_args, expected", [
    (lambda run, tmp: ["generate", "--mask", str(_bad_mask(tmp))],
     "bad_seg.nii.gz: unexpected tumour label values [7]"),
    (lambda run, tmp: ["generate", "--num-inference-steps", "0"], "num_inference_steps must be >= 1"),
    (lambda run, tmp: ["train", "--transformer-path", run["export_path"], "--output-dir", str(tmp / "t")],
     "a 'maskgit_stage1' checkpoint, expected one of maskgit_stage2_label, maskgit_stage2_incontext"),
])
def test_bad_input_is_one_clear_line(stage3_run, stage1_run, tmp_path, make_args, expected):
    args = make_args({**stage3_run, **stage1_run}, tmp_path)
    if args[0] == "generate":
        args += ["--checkpoint", str(stage3_run["stage3"] / "best.ckpt"), "--output", str(tmp_path / "gen")]
    result = cli(CMD, *args, "--dataset-dir", stage3_run["dataset_dir"], check=False)
    assert result.returncode != 0
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "gen").exists() or not any((tmp_path / "gen").iterdir())


def _bad_mask(tmp_path: Path) -> Path:
    seg = np.zeros((20, 20, 20), np.uint8)
    seg[5:10, 5:10, 5:10] = 7
    nib.save(nib.Nifti1Image(seg, np.eye(4)), tmp_path / "bad_seg.nii.gz")
    return tmp_path / "bad_seg.nii.gz"
