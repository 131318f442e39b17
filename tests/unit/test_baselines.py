"""The trivial baselines (DESIGN §9) on volumes where the answer is known, and the verdict in a real Ignite run."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine

from prod9_components.metrics.baselines import BaselineVerdict, TranslationBaselines, pool_baseline
from prod9_components.metrics.image_quality import (
    MAX_PSNR,
    brain_psnr,
    reconstruction_baseline_metrics,
    translation_metrics,
)


def test_pooling_keeps_a_constant_volume_and_averages_detail_finer_than_the_factor():
    constant = torch.full((2, 1, 8, 12, 16), 0.7)
    assert torch.allclose(pool_baseline(constant, 4), constant, atol=1e-6)
    # A checkerboard of period 2 has no detail a factor-2 grid can hold: every cell averages to 0.5.
    index = torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij")).sum(0)
    checker = (index % 2).float()[None, None]
    assert torch.allclose(pool_baseline(checker, 2), torch.full_like(checker, 0.5), atol=1e-6)
    assert torch.equal(pool_baseline(checker, 1), checker)
    # A side the factor does not divide keeps its shape (the last cell is smaller).
    assert pool_baseline(torch.rand(1, 1, 10, 9, 8), 4).shape == (1, 1, 10, 9, 8)


def _brains(transfer, cases=3, seed=0):
    """Source volumes (1, 12, 12, 12) with a zero background rim and their targets ``transfer(source)``."""
    generator = torch.Generator().manual_seed(seed)
    sources, targets = [], []
    for _ in range(cases):
        source = 0.05 + 0.9 * torch.rand(1, 12, 12, 12, generator=generator)
        source[:, :2] = 0
        sources.append(source)
        targets.append(torch.where(source > 0, transfer(source), torch.zeros(())))
    return sources, targets


def cubic(s):
    return 0.9 - 1.2 * s + 2.0 * s**2 - 1.5 * s**3


def test_regression_recovers_a_known_cubic_map():
    sources, targets = _brains(cubic)
    fitted = TranslationBaselines(degree=3).fit(sources[:2], targets[:2])
    assert fitted.coefficients.tolist() == pytest.approx([0.9, -1.2, 2.0, -1.5], abs=1e-6)
    predicted = fitted.regression(sources[2][None])
    assert torch.allclose(predicted, targets[2][None], atol=1e-5)  # held-out case, background included
    assert brain_psnr(predicted, targets[2][None]).item() > 90


def test_histogram_matching_follows_a_monotone_map_but_cannot_invert_a_contrast():
    monotone = TranslationBaselines().fit(*_brains(lambda s: s**2))
    sources, targets = _brains(lambda s: s**2, seed=1)
    matched = monotone.histogram(sources[0][None])
    assert (matched - targets[0][None]).abs().max() < 0.03  # quantile resolution of 256 levels
    inverted = TranslationBaselines().fit(*_brains(lambda s: 1 - s))
    sources, targets = _brains(lambda s: 1 - s, seed=1)
    matched, regressed = inverted.histogram(sources[0][None]), inverted.regression(sources[0][None])
    brain = targets[0][None] > 0
    # Histogram matching keeps the order of intensities: bright stays bright, the error is large.
    assert (matched - targets[0][None])[brain].abs().mean() > 0.2
    assert (regressed - targets[0][None])[brain].abs().max() < 1e-5


def test_baselines_refuse_an_unfitted_use_and_the_wrong_number_of_sources():
    with pytest.raises(RuntimeError, match="fit"):
        TranslationBaselines().regression(torch.zeros(1, 1, 4, 4, 4))
    fitted = TranslationBaselines().fit(*_brains(cubic))
    with pytest.raises(ValueError, match="1 source"):
        fitted.regression(torch.zeros(1, 2, 4, 4, 4))


def _run(outputs: list[dict], metrics: dict) -> dict:
    engine = Engine(lambda engine, batch: batch)
    for name, metric in metrics.items():
        metric.attach(engine, name)
    return engine.run(outputs, max_epochs=1).metrics


def _volume(seed: int, shape=(1, 1, 32, 32, 32)) -> torch.Tensor:
    image = 0.2 + 0.8 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    image[..., :3, :, :] = 0
    return image


def test_reconstruction_verdict_in_an_ignite_run():
    from monai.handlers import IgniteMetricHandler, from_engine

    from prod9_components.metrics.image_quality import BrainPSNRMetric, BrainSSIMMetric, MSSSIMMetric

    def metrics():
        pair = from_engine(["pred", "label"])
        scores = {"psnr": IgniteMetricHandler(BrainPSNRMetric(), output_transform=pair),
                  "ssim": IgniteMetricHandler(BrainSSIMMetric(), output_transform=pair),
                  "ms_ssim": IgniteMetricHandler(MSSSIMMetric(), output_transform=pair)}
        return {**scores, **reconstruction_baseline_metrics()}

    label = _volume(0)
    baseline = pool_baseline(label, 4)
    perfect = _run([[{"pred": label[0], "label": label[0], "pool_baseline": baseline[0]}]], metrics())
    assert perfect["psnr"] == MAX_PSNR and perfect["beats_baselines"] == 1.0
    assert perfect["best_baseline_psnr"] == pytest.approx(brain_psnr(baseline, label).item(), rel=1e-5)
    assert perfect["margin_psnr"] == pytest.approx(MAX_PSNR - perfect["best_baseline_psnr"], rel=1e-5)
    # A model that returns the baseline ties it: no margin, no win.
    tie = _run([[{"pred": baseline[0], "label": label[0], "pool_baseline": baseline[0]}]], metrics())
    assert tie["margin_psnr"] == 0.0 and tie["beats_baselines"] == 0.0


def test_translation_verdict_takes_the_best_baseline_per_score():
    label, source = _volume(0), _volume(1)
    tumour = torch.zeros_like(label)
    tumour[..., 10:20, 10:20, 10:20] = 1
    noisy = (label + 0.05 * torch.randn(label.shape, generator=torch.Generator().manual_seed(2))) * (label > 0)
    output = {"pred": noisy, "label": label, "tumour": tumour, "roundtrip": label, "source": source,
              "histogram_source": (label + source) / 2, "regression_source": source}
    metrics = _run([output], translation_metrics())
    baselines = ("copy_source", "histogram_source", "regression_source")
    for score in ("psnr", "ssim", "psnr_tumour", "ssim_tumour"):
        best = max(metrics[f"{b}_{score}"] for b in baselines)
        assert metrics[f"best_baseline_{score}"] == best
        assert metrics[f"best_baseline_{score}"] == metrics[f"histogram_source_{score}"]  # the closest to the label
    assert metrics["beats_baselines"] == 1.0  # mild noise beats every blend of another volume
    losing = _run([{**output, "pred": source}], translation_metrics())
    assert losing["beats_baselines"] == 0.0 and losing["margin_psnr"] < 0


def test_verdict_skips_missing_scores_and_handles_lower_is_better():
    verdict = BaselineVerdict(("w1", "dice"), ("mean_volume",), higher_is_better=False)
    result = verdict.verdict({"w1": 0.1, "mean_volume_w1": 0.3, "dice": float("nan"), "mean_volume_dice": 0.5})
    assert result == {"best_baseline_w1": 0.3, "margin_w1": pytest.approx(0.2), "beats": 1.0}
    assert math.isnan(verdict.verdict({})["beats"])


def test_baselines_fitted_on_demo_training_cases_invert_the_t1_to_t2_contrast(demo_dataset_dir):
    from monai.transforms import Compose

    from prod9_components.data import discover_cases, preprocessing
    from prod9_components.engines.translation_baselines import baseline_predictions, fit_translation_baselines

    cases = discover_cases(demo_dataset_dir)
    fitted = fit_translation_baselines(cases[:4], ["T1"], ["T1", "T2"], spacing=(8.0, 8.0, 8.0))
    assert list(fitted) == [2]  # the source is never a target
    held_out = Compose(preprocessing(["t1", "t2"], spacing=(8.0, 8.0, 8.0), k_divisible=1))(cases[5])
    t1, t2 = held_out["t1"].as_tensor()[None], held_out["t2"].as_tensor()[None]
    predicted = baseline_predictions(fitted, t1, torch.tensor([2]))
    copy = brain_psnr(t1, t2).item()
    regression = brain_psnr(predicted["regression_source"], t2).item()
    histogram = brain_psnr(predicted["histogram_source"], t2).item()
    # T2 inverts T1's grey/white contrast: an order-keeping map loses to a cubic that learns the inversion.
    assert regression > histogram and regression > copy + 3
