"""maisi_stage2_diffusion through `python -m monai.bundle run` and its CLI, chained on a tiny VAE trained by the suite."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from prod9_components.data.latent_cache import load_latent_file
from prod9_components.networks.export import atomic_save, build_network, load_record
from tests.helpers import DIFFUSION, FEW_SAMPLES, bundle_run, cli

pytestmark = pytest.mark.slow

TINY = str(DIFFUSION / "tiny.json")
GENERATION_SCORES = ("brain_dice", "real_brain_dice", "intensity_w1", "real_intensity_w1", "gradient_w1",
                     "real_gradient_w1", "sample_ms_ssim", "real_ms_ssim", "nearest_training_distance",
                     "real_nearest_training_distance", "memorised_fraction")


def test_training_writes_an_ema_record_with_everything_generation_needs(maisi_diffusion_run):
    out = Path(maisi_diffusion_run["output_dir"])
    record = load_record(out / "best.ckpt", stages=["maisi_stage2_diffusion"])
    assert record["weights"] == "ema" and record["scheduler_args"]["use_timestep_transform"] is True
    assert record["vae_path"] == str(Path(maisi_diffusion_run["vae_path"]).resolve())
    assert all(n % 4 == 0 for n in record["latent_size"])  # the tiny UNet downsamples twice
    last = torch.load(out / "last.ckpt", weights_only=True)
    assert last["epoch"] == 4 and last["trainer"]["iteration"] == int(last["network"]["num_updates"]) == 16  # 4 x 4
    # last.ckpt's fingerprint holds the VAE export's hash: a resume on another export is refused
    assert last["fingerprint"]["vae_sha256"] == record["vae_sha256"]
    # best.ckpt holds the average, not the raw weights the optimizer moved
    raw, ema = last["unet"], {k.removeprefix("module."): v for k, v in last["network"].items() if k != "num_updates"}
    assert max(float((raw[k] - ema[k]).abs().max()) for k in raw) > 1e-6
    # the scale factor makes the training latents' std 1
    # the latents' folder is the one with the scale factor beside them (the cache dir also holds the cases' grids, in a
    # folder whose name may sort first)
    (scale_file,) = Path(maisi_diffusion_run["latent_cache_dir"]).glob("*/scale_factor_*.json")
    values = np.concatenate([load_latent_file(f)["latent"].ravel() for f in sorted(scale_file.parent.glob("*.npz"))])
    scale = json.loads(scale_file.read_text())["scale_factor"]
    assert record["scale_factor"] == scale and 0.8 < (values * scale).std() < 1.25  # all cases, not only training


def test_trained_samples_are_closer_to_real_intensities_than_untrained_ones(maisi_diffusion_run, tmp_path):
    """The stated distance (Wasserstein-1 of voxel intensities, generated vs real validation volumes, the same seeds)
    drops from the untrained network to the 2-epoch one; evaluate.json writes it to metrics.json."""
    run = maisi_diffusion_run
    trained = Path(run["output_dir"]) / "best.ckpt"
    record = load_record(trained)
    torch.manual_seed(0)
    record["state_dict"] = type(build_network(record))(**record["network_args"]).state_dict()  # initial weights
    atomic_save(record, tmp_path / "untrained.ckpt")
    scores = {}
    for name, checkpoint in (("untrained", tmp_path / "untrained.ckpt"), ("trained", trained)):
        metrics_path = tmp_path / f"{name}.json"
        bundle_run(DIFFUSION, ["train.json", "tiny.json", "evaluate.json"], {
            "dataset_dir": run["dataset_dir"], "output_dir": run["output_dir"], "checkpoint": checkpoint,
            "latent_cache_dir": run["latent_cache_dir"], "metrics_path": metrics_path})
        scores[name] = json.loads(metrics_path.read_text())
    for name in ("untrained", "trained"):
        assert {"val_loss", "intensity_w1", "gradient_w1", "intensity_w1_T2"} <= set(scores[name])
        # Every generation score beside its real reference, per modality and their mean, finite.
        keys = [k + m for k in GENERATION_SCORES for m in ("", "_T1", "_T1ce", "_T2", "_FLAIR")]
        assert all(math.isfinite(scores[name][k]) for k in ["val_loss", *keys]), scores[name]
        assert 0 <= scores[name]["brain_dice"] <= 1 and 0 <= scores[name]["memorised_fraction"] <= 1
        assert 0.7 < scores[name]["real_brain_dice"] <= 1 and 0 < scores[name]["real_ms_ssim"] < 1
    # The real references do not depend on the network.
    assert {k: v for k, v in scores["trained"].items() if k.startswith("real_")} == \
        {k: v for k, v in scores["untrained"].items() if k.startswith("real_")}
    # measured: val_loss 1.70 -> 1.09, intensity_w1 0.298 -> 0.238 (4 sampling steps of a 16-step model)
    assert scores["trained"]["val_loss"] < 0.8 * scores["untrained"]["val_loss"], scores
    assert scores["trained"]["intensity_w1"] < 0.9 * scores["untrained"]["intensity_w1"], scores


def test_cli_generate_writes_valid_nifti_and_refuses_bad_input(maisi_diffusion_run, tmp_path):
    run = maisi_diffusion_run
    checkpoint = str(Path(run["output_dir"]) / "best.ckpt")
    record = load_record(checkpoint)
    out = tmp_path / "generated"
    args = ["generate", "--config", TINY, "--checkpoint", checkpoint, "--output", str(out), "--num-samples", "2",
            "--num-inference-steps", "10", "--modality", "T2"]
    result = cli("prod9-train-maisi-diffusion", *args)
    assert result.stdout.strip().splitlines()[-1] == (f"generated volumes: 2 file(s) written to {out} "
                                                      "(sample_0001_T2.nii.gz ... sample_0002_T2.nii.gz)")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["sample_0001_T2.nii.gz", "sample_0002_T2.nii.gz"]
    # The same command again would replace them: refused, naming the file and the flag, before any sampling.
    written = {f: (out / f).stat().st_mtime_ns for f in files}
    result = cli("prod9-train-maisi-diffusion", *args, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: {out / files[0]} already exists: pass --overwrite to replace it, or choose another output")
    assert {f: (out / f).stat().st_mtime_ns for f in files} == written
    image = nib.load(out / files[0])
    spacing = record["preprocessing"]["spacing"]
    assert image.shape == tuple(4 * n for n in record["latent_size"])
    assert np.allclose(image.affine, np.diag([*spacing, 1.0])) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    data = image.get_fdata()
    assert np.isfinite(data).all() and 0.0 <= data.min() and data.max() <= 1.0 and data.std() > 0.01
    other = nib.load(out / files[1]).get_fdata()
    assert np.abs(data - other).max() > 0.01  # two seeds, two volumes
    # the same workflow as a bundle run: without a modality the sample is unconditional and its name says none
    bundle_run(DIFFUSION, ["train.json", "tiny.json", "checkpoint_inference.json"], {
        "checkpoint": checkpoint, "generate_dir": tmp_path / "bundle", "num_samples": 1, "seed": 7})
    assert [p.name for p in (tmp_path / "bundle").iterdir()] == ["sample_0001.nii.gz"]

    for args, message in (
        (["--num-inference-steps", "0"], "num_inference_steps must be an integer in 1..1000"),
        (["--num-inference-steps", "1001"], "num_inference_steps must be an integer in 1..1000"),
        (["--modality", "T3"], "unknown modality 'T3'"),
    ):
        bad = tmp_path / "bad"
        result = cli("prod9-train-maisi-diffusion", "generate", "--config", TINY, "--checkpoint", checkpoint,
                     "--output", str(bad), *args, check=False)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not bad.exists()


def test_a_vae_with_other_latent_channels_is_refused_before_training(maisi_diffusion_run, tmp_path):
    run = maisi_diffusion_run
    result = bundle_run(DIFFUSION, ["train.json", "tiny.json"], {
        "dataset_dir": run["dataset_dir"], "output_dir": tmp_path / "out", "vae_path": run["vae_path"],
        "latent_cache_dir": tmp_path / "cache", "latent_channels": 8}, check=False)
    assert result.returncode != 0
    assert "network argument 'latent_channels' is 4 but the config expects 8" in result.stderr
    assert not (tmp_path / "out" / "best.ckpt").exists() and not (tmp_path / "cache").exists()


def test_training_validates_on_the_loss_alone_when_told_not_to_sample(maisi_diffusion_run, tmp_path, caplog):
    """``sample_during_validation`` false: training's validation reports the velocity loss without sampling (no
    sample score such as brain_dice); true, the default, samples and scores them."""
    run = maisi_diffusion_run
    for given, sampled in (("false", False), ("true", True)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="monai.handlers.StatsHandler"):
            bundle_run(DIFFUSION, ["train.json", "tiny.json"], {
                "dataset_dir": run["dataset_dir"], "vae_path": run["vae_path"],
                "latent_cache_dir": run["latent_cache_dir"], "output_dir": tmp_path / given, "epochs": 1,
                "limit_train_batches": 1, "sample_during_validation": given, **FEW_SAMPLES})
        messages = [r.getMessage() for r in caplog.records]
        (line,) = [m for m in messages if "Metrics --" in m]  # the one validation
        assert any("Key metric: val_loss" in m for m in messages), messages
        assert ("brain_dice" in line) is sampled, line
