"""maisi_stage3_controlnet through `python -m monai.bundle run` and its CLI, chained VAE -> diffusion -> ControlNet on
tiny networks trained by the suite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from prod9_components.data.case_cache import file_sha256
from prod9_components.networks.export import atomic_save, load_record
from tests.helpers import MAISI_CONTROLNET, bundle_run, cli

pytestmark = pytest.mark.slow

TINY = str(MAISI_CONTROLNET / "tiny.json")


def test_training_keeps_the_diffusion_unet_frozen_and_records_what_generation_needs(maisi_controlnet_run):
    run = maisi_controlnet_run
    record = load_record(Path(run["output_dir"]) / "best.ckpt", stages=["maisi_stage3_controlnet"])
    base = load_record(run["diffusion_path"])
    assert (record["condition_type"], record["source_modality"]) == ("mask+image+label", "T1")
    assert record["latent_size"] == base["latent_size"] and record["scale_factor"] == base["scale_factor"]
    assert record["diffusion_sha256"] == file_sha256(run["diffusion_path"]) and record["vae_path"] == base["vae_path"]
    weights = record["state_dict"]
    assert all(torch.equal(weights[f"base.{k}"], v) for k, v in base["state_dict"].items())  # bit for bit
    # the zero-initialised residual projections and conditioning output layer have moved
    assert weights["controlnet.controlnet_mid_block.conv.weight"].abs().max() > 0
    assert weights["controlnet.controlnet_cond_embedding.conv_out.conv.weight"].abs().max() > 0
    last = torch.load(Path(run["output_dir"]) / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["trainer"]["iteration"] == 8  # 2 epochs x 4 steps


def test_the_learning_rate_follows_the_schedule_it_is_given(maisi_controlnet_run, tmp_path):
    """``--lr-schedule cosine --warmup-steps 1`` (what the demo's translation check trains with): warm-up, then half a
    cosine to 0 at the last step, the schedule saved in last.ckpt for a resume."""
    run, out, probe = maisi_controlnet_run, tmp_path / "run", tmp_path / "probe.json"
    probe.write_text(json.dumps({
        "lr_probe": {"_target_": "tests.dist_probe.LearningRates", "output_dir": "@output_dir",
                     "optimizer": "@optimizer"},
        "run": ["$@lr_probe.attach(@train#trainer)", "$@train#trainer.run()"]}))
    bundle_run(MAISI_CONTROLNET, ["train.json", "tiny.json", str(probe)], {
        "dataset_dir": run["dataset_dir"], "latent_cache_dir": run["latent_cache_dir"], "output_dir": out,
        "diffusion_path": run["diffusion_path"], "epochs": 1, "val_interval": 100, "lr_schedule": "cosine",
        "warmup_steps": 1})
    lrs = {int(k): v for k, v in json.loads((out / "learning_rates.json").read_text()).items()}
    # tiny.json: 4 steps at 1e-3; after step i the factor is 0.5 (1 + cos(pi (i - 1) / 3))
    assert lrs == pytest.approx({1: 1e-3, 2: 7.5e-4, 3: 2.5e-4, 4: 0.0}, abs=1e-12)
    assert torch.load(out / "last.ckpt", weights_only=True)["lr_scheduler"]["last_epoch"] == 4


def test_scheduler_overrides_replace_the_base_schedulers_arguments_in_training_and_the_record(maisi_controlnet_run,
                                                                                             tmp_path):
    """``--scheduler-overrides#use_timestep_transform False`` (the translation check's): the ControlNet trains and
    records the base's scheduler with that one argument replaced, so its test and generation sample on uniform steps
    instead of the base's resolution-shifted ones."""
    from monai.networks.schedulers import RFlowScheduler

    from prod9_components.sampling.rectified_flow import sampling_timesteps

    run, out = maisi_controlnet_run, tmp_path / "run"
    bundle_run(MAISI_CONTROLNET, ["train.json", "tiny.json"], {
        "dataset_dir": run["dataset_dir"], "latent_cache_dir": run["latent_cache_dir"], "output_dir": out,
        "diffusion_path": run["diffusion_path"], "epochs": 1, "val_interval": 1, "sample_during_validation": False,
        "scheduler_overrides": {"use_timestep_transform": False}})
    base = load_record(run["diffusion_path"])
    record = load_record(out / "best.ckpt", stages=["maisi_stage3_controlnet"])
    assert base["scheduler_args"]["use_timestep_transform"] is True
    assert record["scheduler_args"] == {**base["scheduler_args"], "use_timestep_transform": False}
    steps = {name: sampling_timesteps(RFlowScheduler(**args), 10, record["latent_size"])
             for name, args in (("base", base["scheduler_args"]), ("overridden", record["scheduler_args"]))}
    assert steps["overridden"].tolist() == pytest.approx([1000 - 100 * i for i in range(11)])
    assert steps["base"][1] < 850  # a small latent: the base's steps crowd towards the clean end


def test_evaluate_reports_translation_and_tumour_scores_on_one_table(maisi_controlnet_run, tmp_path):
    """BraSyn-style PSNR/SSIM beside the VAE round trip and the three translation baselines, MaskGiT stage 3's
    tumour keys, and segment-the-synthetic."""
    run = maisi_controlnet_run
    metrics_path = tmp_path / "metrics.json"
    result = bundle_run(MAISI_CONTROLNET, ["train.json", "tiny.json", "evaluate.json"], {
        "dataset_dir": run["dataset_dir"], "output_dir": run["output_dir"], "latent_cache_dir": run["latent_cache_dir"],
        "metrics_path": metrics_path, "split": "test"})
    metrics = json.loads(metrics_path.read_text())
    scores = ("psnr", "ssim", "psnr_tumour", "ssim_tumour")
    translation = (*scores, "roundtrip_psnr", "roundtrip_ssim", "beats_baselines",
                   *(f"{baseline}_{score}" for baseline in ("copy_source", "histogram_source", "regression_source")
                     for score in scores),
                   *(f"{kind}_{score}" for kind in ("best_baseline", "margin") for score in scores))
    control = ("sensitivity", "change_inside", "change_outside", "contrast_error_oedema", "real_contrast_oedema")
    segmentation = ("seg_dice_generated", "seg_dice_real", "seg_dice_ratio")
    assert all(math.isfinite(metrics[k]) for k in ("val_loss", *translation, *control, *segmentation)), metrics
    assert metrics["num_cases"] == 1 and metrics["split"] == "test"  # one test case (2 of its 3 targets scored)
    assert metrics["condition_type"] == "mask+image+label" and metrics["source_modality"] == "T1"
    assert metrics["psnr"] != metrics["copy_source_psnr"] != metrics["roundtrip_psnr"]
    assert metrics["change_inside"] > 0  # the trained mask branch changes the sample inside the tumour
    # the verdict is the best baseline's score and the model's margin over it
    for score in scores:
        best = max(metrics[f"{b}_{score}"] for b in ("copy_source", "histogram_source", "regression_source"))
        assert metrics[f"best_baseline_{score}"] == pytest.approx(best)
        assert metrics[f"margin_{score}"] == pytest.approx(metrics[score] - best)
    assert metrics["beats_baselines"] == float(all(metrics[f"margin_{s}"] > 0 for s in scores))
    # segment-the-synthetic: the segmenter the training run built at its first validation is reused, not retrained
    assert "tumour segmenter: reusing" in result.stdout and "tumour segmenter: training" not in result.stdout
    assert Path(metrics["segmenter_dir"]).parent == Path(run["output_dir"]) / "segmenter"
    assert 0 <= metrics["seg_dice_generated"] <= 1 and 0 < metrics["seg_dice_real"] <= 1
    assert metrics["seg_dice_ratio"] == pytest.approx(metrics["seg_dice_generated"] / metrics["seg_dice_real"])
    own = json.loads((Path(metrics["segmenter_dir"]) / "metrics.json").read_text())
    assert own["num_test_volumes"] == 4 and 0 < own["dice_test"] <= 1  # its own Dice: 1 real test case x 4 modalities
    # validation during training logged the same scores to TensorBoard
    events = EventAccumulator(str(Path(run["output_dir"]) / "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"seg_dice_generated", "seg_dice_real", "seg_dice_ratio", "histogram_source_psnr",
            "beats_baselines"} <= tags, sorted(tags)


def test_bad_sampling_settings_are_refused_before_anything_is_written(maisi_controlnet_run, tmp_path):
    """``train`` and ``test`` into a fresh folder with a bad ``--segmentation-samples`` or ``--conditioning-scale``:
    one line naming the setting, exit 2, and no folder (the bundle checks both in ``initialize``, before the split is
    recorded)."""
    run = maisi_controlnet_run
    data = ("--config", TINY, "--dataset-dir", run["dataset_dir"], "--latent-cache-dir", run["latent_cache_dir"])
    verbs = {"train": ("train", "--diffusion-path", run["diffusion_path"]),
             "test": ("test", "--checkpoint", str(Path(run["output_dir"]) / "best.ckpt"))}
    for flag, bad, message in (
            ("--segmentation-samples", "0", "segmentation_samples must be a whole number >= 1, got 0"),
            ("--segmentation-samples", "1.5", "segmentation_samples must be a whole number >= 1, got 1.5"),
            ("--conditioning-scale", "-1", "conditioning_scale must be a finite number >= 0 (1 = the ControlNet as "
                                           "trained), got -1")):
        for name, verb in verbs.items():
            out = tmp_path / f"{name}{flag}{bad}"
            result = cli("prod9-train-maisi-controlnet", *verb, *data, "--output-dir", str(out), flag, bad,
                         check=False)
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
            assert not out.exists()

def _test_case(run) -> dict:
    return json.loads((Path(run["output_dir"]) / "datalist.json").read_text())["test"][0]


def test_cli_generates_from_a_mask_on_another_grid_and_a_source(maisi_controlnet_run, tmp_path):
    run = maisi_controlnet_run
    checkpoint = str(Path(run["output_dir"]) / "best.ckpt")
    record = load_record(checkpoint)
    case = _test_case(run)
    seg = nib.load(case["seg"])
    cropped = tmp_path / "mask.nii.gz"  # two background slices fewer, origin moved: the same world positions
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[2:], seg.affine @ np.array(
        [[1, 0, 0, 2], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)), str(cropped))
    outputs = {}
    for name, mask in (("cropped", cropped), ("original", case["seg"])):
        outputs[name] = tmp_path / name
        result = cli("prod9-train-maisi-controlnet", "generate", "--config", TINY, "--checkpoint", checkpoint,
                     "--mask", str(mask), "--source", case["t1"], "--source-modality", "T1", "--modality", "T2",
                     "--num-inference-steps", "4", "--output", str(outputs[name]))
        assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in outputs["cropped"].iterdir())
    assert files == ["mask_T2.nii.gz", "mask_mask.nii.gz"]
    image, mask = nib.load(outputs["cropped"] / files[0]), nib.load(outputs["cropped"] / files[1])
    assert image.shape == mask.shape == tuple(4 * n for n in record["latent_size"])
    assert np.allclose(image.affine, mask.affine) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    data = image.get_fdata()
    assert np.isfinite(data).all() and 0.0 <= data.min() and data.max() <= 1.0 and data.std() > 0.01
    labels = np.asarray(mask.dataobj)
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3} and labels.max() > 0
    # the mask on its other grid was resampled onto the source's: the same mask and, from the same seed, the same sample
    original = outputs["original"]
    assert np.array_equal(labels, np.asarray(nib.load(next(original.glob("*_mask.nii.gz"))).dataobj))
    assert np.allclose(data, nib.load(next(original.glob("*_T2.nii.gz"))).get_fdata(), atol=1e-5)
    # Generating into the same folder again is refused without --overwrite (nothing is replaced).
    result = cli("prod9-train-maisi-controlnet", "generate", "--config", TINY, "--checkpoint", checkpoint, "--mask",
                 str(cropped), "--source", case["t1"], "--source-modality", "T1", "--modality", "T2",
                 "--num-inference-steps", "4", "--output", str(outputs["cropped"]), check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: {outputs['cropped'] / 'mask_T2.nii.gz'} already exists: pass --overwrite to replace it, or choose "
        "another output")
    assert np.array_equal(nib.load(outputs["cropped"] / "mask_T2.nii.gz").get_fdata(), data)

    for args, message in (
        (["--mask", case["seg"], "--source", case["t1"], "--modality", "T1"],
         "the source modality T1 equals the target modality"),
        (["--mask", case["seg"], "--source", case["t2"], "--source-modality", "T2"],
         "this ControlNet was trained to translate from T1, not T2"),
        (["--mask", case["seg"]], "this ControlNet is steered by --source too"),
        (["--mask", case["seg"], "--source", case["t1"], case["t1"]], "got 1 mask(s) but 2 source image(s)"),
        (["--mask", str(tmp_path / "missing.nii.gz"), "--source", case["t1"]], "missing.nii.gz: no such mask file"),
    ):
        bad = tmp_path / "bad"
        result = cli("prod9-train-maisi-controlnet", "generate", "--config", TINY, "--checkpoint", checkpoint,
                     "--output", str(bad), *args, check=False)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and not bad.exists()


def test_generate_conditioning_scale_zero_is_the_diffusion_model_alone(maisi_controlnet_run, tmp_path):
    """``generate --conditioning-scale 0``: the ControlNet adds nothing, so the case's mask and an empty mask (with
    the same source and seed) give the same volume; at the default scale (1, as trained) they differ."""
    run = maisi_controlnet_run
    case = _test_case(run)
    seg = nib.load(case["seg"])
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(seg.shape, np.uint8), seg.affine), str(empty))
    volumes = {}
    for scale in ("0", "1"):
        for name, mask in (("case", case["seg"]), ("empty", str(empty))):
            out = tmp_path / f"{name}_{scale}"
            cli("prod9-train-maisi-controlnet", "generate", "--config", TINY, "--checkpoint",
                str(Path(run["output_dir"]) / "best.ckpt"), "--mask", mask, "--source", case["t1"],
                "--source-modality", "T1", "--modality", "T2", "--num-inference-steps", "4",
                "--conditioning-scale", scale, "--output", str(out))
            volumes[name, scale] = nib.load(next(out.glob("*_T2.nii.gz"))).get_fdata()
    assert np.array_equal(volumes["case", "0"], volumes["empty", "0"])
    assert np.abs(volumes["case", "1"] - volumes["empty", "1"]).max() > 1e-3
    for bad, message in (  # refused in one line naming the flag; nothing written
            ("-1", "conditioning_scale must be a finite number >= 0 (1 = the ControlNet as trained), got -1"),
            ("nan", "--conditioning-scale: expected a number like the bundle's default 1.0, got 'nan'"),  # a word
            ("strong", "--conditioning-scale: expected a number like the bundle's default 1.0, got 'strong'")):
        result = cli("prod9-train-maisi-controlnet", "generate", "--config", TINY, "--checkpoint",
                     str(Path(run["output_dir"]) / "best.ckpt"), "--mask", case["seg"], "--source", case["t1"],
                     "--conditioning-scale", bad, "--output", str(tmp_path / "bad"), check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
        assert not (tmp_path / "bad").exists()


def test_a_diffusion_checkpoint_of_another_latent_size_is_refused(maisi_controlnet_run, tmp_path):
    run = maisi_controlnet_run
    record = load_record(run["diffusion_path"])
    record["latent_size"] = [4, 4, 4]  # e.g. trained at a coarser spacing
    atomic_save(record, tmp_path / "small.ckpt")
    result = cli("prod9-train-maisi-controlnet", "train", "--config", TINY, "--diffusion-path",
                 str(tmp_path / "small.ckpt"), "--output-dir", str(tmp_path / "out"), "--dataset-dir",
                 run["dataset_dir"], "--latent-cache-dir", run["latent_cache_dir"], check=False)
    assert result.returncode == 2 and "is larger than the latent canvas [16, 16, 16] ([4, 4, 4] latent cells x 4); the " \
        "diffusion model was trained on smaller volumes" in result.stderr
    assert not (tmp_path / "out" / "best.ckpt").exists()
