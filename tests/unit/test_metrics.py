"""Image-quality and codebook metrics: analytic values, masking, and a real ignite run via IgniteMetricHandler."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import IgniteMetricHandler, from_engine

from prod9_components.metrics import (
    MAX_PSNR,
    BrainPSNRMetric,
    BrainSSIMMetric,
    CodebookUsageMetric,
    MSSSIMMetric,
    brain_psnr,
    brain_ssim,
    codebook_histogram,
    codebook_perplexity,
    codebook_usage,
    ms_ssim,
    ms_ssim_min_size,
)
from prod9_components.metrics.image_quality import ssim_and_cs


def _brain(shape=(2, 1, 12, 12, 12), seed=0):
    """Random intensities in (0.2, 1] inside a central cube, exactly 0 outside (a preprocessed 'brain')."""
    image = 0.2 + 0.8 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    inside = torch.zeros(shape, dtype=torch.bool)
    inside[..., 2:-2, 2:-2, 2:-2] = True
    return torch.where(inside, image, torch.zeros(())), inside


# ---------------------------------------------------------------- PSNR / SSIM


def test_identical_volumes_score_capped_psnr_and_ssim_one():
    target, _ = _brain()
    assert torch.equal(brain_psnr(target, target.clone()), torch.full((2,), MAX_PSNR))
    assert torch.allclose(brain_ssim(target, target.clone()), torch.ones(2), atol=1e-6)


def test_psnr_matches_analytic_value_for_known_error():
    target, inside = _brain()
    # +-0.05 on every brain voxel: mse = 0.0025 exactly, PSNR = 10 log10(1 / 0.0025) = 26.0206 dB.
    signs = torch.where(torch.rand(target.shape, generator=torch.Generator().manual_seed(1)) > 0.5, 1.0, -1.0)
    pred = target + 0.05 * signs * inside
    expected = 10 * math.log10(1.0 / 0.05**2)
    assert torch.allclose(brain_psnr(pred, target), torch.full((2,), expected), atol=1e-4)
    # data_range scales the peak: range 2 adds 20 log10(2) dB.
    assert torch.allclose(
        brain_psnr(pred, target, data_range=2.0), torch.full((2,), expected + 20 * math.log10(2)), atol=1e-4
    )


def test_corruption_outside_the_mask_does_not_change_scores():
    target, inside = _brain(shape=(1, 1, 16, 16, 16))
    pred = target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2)) * inside
    corrupted = pred + 0.7 * (~inside)  # background only
    assert brain_psnr(corrupted, target).item() == pytest.approx(brain_psnr(pred, target).item(), abs=1e-6)
    assert brain_psnr(corrupted, target, mask=torch.ones_like(inside)).item() < brain_psnr(pred, target).item() - 3

    # SSIM windows straddle the border, so use a mask whose (cropped) region the corruption cannot reach.
    core = torch.zeros_like(inside)
    core[..., 6:10, 6:10, 6:10] = True
    far = torch.zeros_like(inside)
    far[..., :2, :, :] = True  # >= 4 voxels away from the core: outside every 7^3 window centred in it
    ssim_clean = brain_ssim(pred, target, mask=core)
    ssim_far = brain_ssim(pred + 0.5 * far, target, mask=core)
    assert ssim_far.item() == pytest.approx(ssim_clean.item(), abs=1e-6)
    assert brain_ssim(pred + 0.5 * core, target, mask=core).item() < ssim_clean.item() - 0.1


def test_ssim_mask_crop_matches_monai_mean_for_full_mask():
    from monai.metrics import SSIMMetric

    target, _ = _brain(shape=(1, 1, 12, 12, 12))
    pred = (target + 0.1 * torch.rand(target.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    ours = brain_ssim(pred, target, mask=torch.ones_like(target, dtype=torch.bool))
    monai = SSIMMetric(spatial_dims=3, win_size=7)(pred, target)  # MONAI: win_size here, kernel_size in MS-SSIM
    assert ours.item() == pytest.approx(monai.item(), abs=1e-5)


def test_separable_ssim_and_ms_ssim_equal_monais():
    from monai.metrics.regression import compute_ms_ssim, compute_ssim_and_cs

    target, _ = _brain(shape=(3, 2, 36, 32, 30))
    pred = 0.8 * target + 0.2 * torch.rand(target.shape, generator=torch.Generator().manual_seed(5))
    for data_range, kernel_size, sigma in ((1.0, 7, 1.5), (2.0, 5, 0.8)):
        ssim, cs = ssim_and_cs(pred, target, data_range, kernel_size, sigma)
        monai_ssim, monai_cs = compute_ssim_and_cs(pred, target, 3, (kernel_size,) * 3, (sigma,) * 3, data_range)
        assert ssim.shape == monai_ssim.shape == (3, 2, 37 - kernel_size, 33 - kernel_size, 31 - kernel_size)
        torch.testing.assert_close(ssim, monai_ssim, atol=2e-5, rtol=0)
        torch.testing.assert_close(cs, monai_cs, atol=2e-5, rtol=0)
    weights = (0.2, 0.3, 0.5)
    torch.testing.assert_close(ms_ssim(pred, target, weights=weights),
                               compute_ms_ssim(pred, target, 3, kernel_size=7, weights=weights).flatten(),
                               atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="one shape"):
        ssim_and_cs(pred, target[..., :-1])


def test_ms_ssim_works_at_32_cubed_and_rejects_smaller():
    assert ms_ssim_min_size() == 28
    target, _ = _brain(shape=(2, 1, 32, 32, 32))
    assert torch.allclose(ms_ssim(target, target), torch.ones(2), atol=1e-5)
    noisy = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(4))
    value = ms_ssim(noisy, target)
    assert value.shape == (2,) and (value < 0.99).all() and (value > 0).all()
    metric = MSSSIMMetric()
    metric(noisy, target)
    assert metric.aggregate().item() == pytest.approx(value.mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="spatial side >= 28"):
        ms_ssim(target[..., :24, :, :], target[..., :24, :, :])
    with pytest.raises(ValueError, match="spatial side >= 28"):
        MSSSIMMetric()(target[..., :24], target[..., :24])


def test_cumulative_metrics_average_over_iterations():
    target, inside = _brain()
    pred = target + 0.05 * inside
    psnr, ssim = BrainPSNRMetric(), BrainSSIMMetric()
    for _ in range(2):
        psnr(pred, target)
        ssim(target, target)
    assert psnr.aggregate().item() == pytest.approx(10 * math.log10(1 / 0.0025), abs=1e-4)
    assert ssim.aggregate().item() == pytest.approx(1.0, abs=1e-6)
    assert psnr.get_buffer().shape == (4, 1)


# ---------------------------------------------------------------- codebook


def test_codebook_uniform_and_single_code():
    k = 16
    uniform = torch.arange(k).repeat(5).view(2, 5, 8)
    counts = codebook_histogram(uniform, k)
    assert counts.tolist() == [5] * k
    assert codebook_usage(counts).item() == 1.0
    assert codebook_perplexity(counts).item() == pytest.approx(k, rel=1e-6)

    single = torch.full((3, 4), 7)
    counts = codebook_histogram(single, k)
    assert codebook_usage(counts).item() == pytest.approx(1 / k)
    assert codebook_perplexity(counts).item() == pytest.approx(1.0)

    # Two codes used equally: perplexity 2.
    assert codebook_perplexity(codebook_histogram(torch.tensor([1, 3, 1, 3]), k)).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="token indices"):
        codebook_histogram(torch.tensor([k]), k)


def test_codebook_metric_accumulates_across_calls():
    usage, perplexity = CodebookUsageMetric(8, "usage"), CodebookUsageMetric(8, "perplexity")
    for chunk in torch.arange(8).view(4, 2):  # each call sees 2 codes, together all 8
        usage(chunk.view(1, 2))
        perplexity(chunk.view(1, 2))
    assert usage.aggregate().item() == 1.0
    assert perplexity.aggregate().item() == pytest.approx(8.0, rel=1e-6)
    assert usage.get_buffer().tolist() == [[1] * 8]  # one running histogram, not one per call
    usage([torch.tensor([3, 3]), torch.tensor([5])])  # a list of per-sample index tensors
    assert usage.get_buffer()[0, [2, 3, 5]].tolist() == [1, 3, 2]
    usage.reset()
    usage(torch.zeros(4, dtype=torch.long))
    assert usage.aggregate().item() == pytest.approx(1 / 8)


# ---------------------------------------------------------------- inside a real ignite Engine


def test_metrics_run_through_ignite_metric_handler():
    target, inside = _brain(shape=(1, 1, 12, 12, 12))
    batches = [
        {"pred": target + 0.05 * inside, "label": target, "indices": torch.tensor([[0, 1, 2, 3]])},
        {"pred": target + 0.05 * inside, "label": target, "indices": torch.tensor([[4, 5, 6, 7]])},
    ]
    engine = Engine(lambda engine, batch: batch)  # the "model output" is the batch itself
    IgniteMetricHandler(metric_fn=BrainPSNRMetric(), output_transform=from_engine(["pred", "label"])).attach(
        engine, "psnr"
    )
    IgniteMetricHandler(metric_fn=BrainSSIMMetric(), output_transform=from_engine(["label", "label"])).attach(
        engine, "ssim"
    )
    IgniteMetricHandler(
        metric_fn=CodebookUsageMetric(16, "usage"), output_transform=lambda output: (output["indices"], None)
    ).attach(engine, "codebook_usage")
    engine.run(batches, max_epochs=1)

    metrics = engine.state.metrics
    assert metrics["psnr"] == pytest.approx(10 * math.log10(1 / 0.0025), abs=1e-4)
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["codebook_usage"] == pytest.approx(0.5)
    assert engine.state.metric_details["psnr"].shape == (2, 1)  # per-sample values saved by the handler
