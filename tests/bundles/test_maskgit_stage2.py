"""Both MaskGiT stage-2 bundles through `python -m monai.bundle run`: train -> evaluate -> inference, chained on a
stage-1 export made by the test session itself."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import FEW_SAMPLES, INCONTEXT, LABEL, bundle_run

pytestmark = pytest.mark.slow


def _common(runs: dict, out: str) -> dict:
    return {"dataset_dir": runs["dataset_dir"], "output_dir": out, "token_cache_dir": runs["token_cache_dir"]}


def test_token_cache_is_shared_and_keyed_by_the_export(stage2_runs):
    caches = [p for p in Path(stage2_runs["token_cache_dir"]).iterdir() if p.is_dir()]
    assert len(caches) == 1, "both bundles must reuse one cache for one export"
    meta = json.loads((caches[0] / "cache.json").read_text())
    assert meta["key"] == caches[0].name
    # Training (4) and validation (1) cases, each encoded once by the two trainings. Another test of this module may
    # have tested on the test split already (its case then joins the cache): the check holds in any test order.
    splits = json.loads((Path(stage2_runs["label"]) / "datalist.json").read_text())
    trained = {c["case"] for c in splits["training"] + splits["validation"]}
    cached = {p.stem for p in caches[0].glob("*.npz")}
    assert len(trained) == 5 and trained <= cached <= trained | {c["case"] for c in splits["test"]}


def test_incontext_chain(stage2_runs):
    out = stage2_runs["incontext"]
    record = torch.load(Path(out) / "best.ckpt", weights_only=True)
    assert record["stage"] == "maskgit_stage2_incontext"
    assert record["source_modalities"] == ["T1"] and record["target_modalities"] == ["T2"]
    assert record["network_args"]["codebook_size"] == 8 * 8 * 8 * 6 * 5

    bundle_run(INCONTEXT, ["train.json", "evaluate.json"], {**_common(stage2_runs, out), "split": "test",
                                                            "num_inference_steps": 2})
    metrics = json.loads((Path(out) / "metrics_test.json").read_text())
    assert metrics["split"] == "test" and metrics["num_cases"] == 1
    for key in ("val_loss", "token_accuracy", "psnr", "ssim", "psnr_tumour", "ssim_tumour", "roundtrip_psnr",
                "roundtrip_ssim"):
        assert isinstance(metrics[key], float), key
    assert metrics["val_loss"] > 0 and 0 <= metrics["token_accuracy"] <= 1
    # Three baselines on the same volumes; the verdict is against the best of them, per score.
    baselines = ("copy_source", "histogram_source", "regression_source")
    for score in ("psnr", "ssim", "psnr_tumour", "ssim_tumour"):
        best = max(metrics[f"{b}_{score}"] for b in baselines)
        assert metrics[f"best_baseline_{score}"] == best
        assert metrics[f"margin_{score}"] == pytest.approx(metrics[score] - best, abs=1e-6)
    # A cubic of T1 fitted on the training cases inverts the T1 -> T2 contrast: it beats copying the source.
    assert metrics["regression_source_psnr"] > metrics["copy_source_psnr"] + 2
    assert metrics["beats_baselines"] in (0.0, 1.0)

    bundle_run(INCONTEXT, ["train.json", "checkpoint_inference.json"],
               {**_common(stage2_runs, out), "num_inference_steps": 2})
    splits = json.loads((Path(out) / "datalist.json").read_text())
    case = splits["test"][0]
    written = Path(out) / "generated" / f"{case['case']}_T2.nii.gz"
    source = nib.load(case["t1"])
    translated = nib.load(written)
    assert translated.shape == source.shape
    np.testing.assert_allclose(translated.affine, source.affine, atol=1e-5)
    assert np.isfinite(translated.get_fdata()).all()


def test_label_chain(stage2_runs):
    out = stage2_runs["label"]
    record = torch.load(Path(out) / "best.ckpt", weights_only=True)
    assert record["stage"] == "maskgit_stage2_label" and record["source_modalities"] == []

    bundle_run(LABEL, ["train.json", "evaluate.json"], {**_common(stage2_runs, out), "split": "test",
                                                         "diversity_samples": 2})
    metrics = json.loads((Path(out) / "metrics_test.json").read_text())
    assert metrics["num_cases"] == 1 and metrics["val_loss"] > 0 and 0 <= metrics["token_accuracy"] <= 1
    # Diversity: MS-SSIM between samples (2 here) per modality, one score per modality and their mean.
    diversity = [metrics[f"sample_ms_ssim_{m}"] for m in record["target_modalities"]]
    assert all(0 < d < 1 for d in diversity) and metrics["sample_ms_ssim"] == pytest.approx(np.mean(diversity))
    # Every generation score beside its real reference (the test case vs the training cases), per modality and mean.
    for key in ("brain_dice", "real_brain_dice", "intensity_w1", "real_intensity_w1", "gradient_w1", "real_gradient_w1",
                "sample_ms_ssim", "real_ms_ssim", "nearest_training_distance", "real_nearest_training_distance",
                "memorised_fraction"):
        for name in ("", *(f"_{m}" for m in record["target_modalities"])):
            assert np.isfinite(metrics[key + name]), key + name
    assert 0 <= metrics["brain_dice"] <= 1 and 0 <= metrics["memorised_fraction"] <= 1
    assert 0.7 < metrics["real_brain_dice"] <= 1 and 0 < metrics["real_ms_ssim"] < 1
    assert metrics["real_nearest_training_distance"] > 0 and metrics["real_intensity_w1"] > 0

    bundle_run(LABEL, ["train.json", "checkpoint_inference.json"],
               {**_common(stage2_runs, out), "num_samples": 2, "modality": "FLAIR", "num_inference_steps": 3})
    samples = sorted((Path(out) / "generated").glob("sample_*_FLAIR.nii.gz"))
    assert [p.name for p in samples] == ["sample_0001_FLAIR.nii.gz", "sample_0002_FLAIR.nii.gz"]
    # Whole volumes: the largest token grid of the cached training/validation cases, times the downsampling (4).
    grids = [np.load(p)["tokens"].shape[1:] for p in Path(stage2_runs["token_cache_dir"]).glob("*/*.npz")]
    assert record["volume_grid"] == np.max(grids, axis=0).tolist()
    image = nib.load(samples[0])
    assert list(image.shape) == [4 * g for g in record["volume_grid"]]
    np.testing.assert_allclose(np.diag(image.affine)[:3], [4.0, 4.0, 4.0])


def test_last_ckpt_records_the_export_and_a_resume_on_another_one_is_refused(stage2_runs, tmp_path):
    """last.ckpt's fingerprint holds the stage-1 export's sha256; resuming it with another export (a retrained
    stage 1: other bytes) stops with one line naming last.ckpt and the new export instead of training on other
    tokens."""
    from prod9_components.data.case_cache import file_sha256
    from prod9_components.networks.export import atomic_save, load_record

    export = os.path.abspath(stage2_runs["autoencoder_path"])
    last = torch.load(Path(stage2_runs["label"]) / "last.ckpt", weights_only=True)
    assert last["fingerprint"]["autoencoder_sha256"] == file_sha256(export)

    other = tmp_path / "retrained.pt"
    atomic_save({**load_record(export), "note": "retrained"}, other)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(Path(stage2_runs["label"]) / "last.ckpt", run / "last.ckpt")
    result = bundle_run(LABEL, ["train.json", "tiny.json"], {
        "dataset_dir": stage2_runs["dataset_dir"], "output_dir": run, "autoencoder_path": other,
        "token_cache_dir": tmp_path / "cache", "epochs": 2}, check=False)
    assert result.returncode != 0
    assert (f"{run / 'last.ckpt'}: it was trained with autoencoder_sha256={file_sha256(export)[:16]}…, this run has "
            f"{file_sha256(other)[:16]}… (another upstream file: {other})") in result.stderr


def test_training_validates_on_the_loss_alone_when_told_not_to_sample(stage2_runs, tmp_path, caplog):
    """``sample_during_validation`` false: training's validation reports the loss and token accuracy without
    sampling (no sample score such as brain_dice); true, the default, samples and scores them."""
    for given, sampled in (("false", False), ("true", True)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="monai.handlers.StatsHandler"):
            bundle_run(LABEL, ["train.json", "tiny.json"], {
                **_common(stage2_runs, str(tmp_path / given)), "autoencoder_path": stage2_runs["autoencoder_path"],
                "epochs": 1, "limit_train_batches": 1, "sample_during_validation": given, **FEW_SAMPLES})
        (line,) = [r.getMessage() for r in caplog.records if "Metrics --" in r.getMessage()]  # the one validation
        assert "token_accuracy" in line, line
        assert ("brain_dice" in line) is sampled, line
