"""Evaluation metrics: functional forms and MONAI cumulative metrics for ``IgniteMetricHandler``."""

from prod9_components.metrics.codebook import (
    CodebookUsageMetric,
    codebook_histogram,
    codebook_perplexity,
    codebook_usage,
)
from prod9_components.metrics.image_quality import (
    MAX_PSNR,
    MS_SSIM_WEIGHTS,
    BrainPSNRMetric,
    BrainSSIMMetric,
    MSSSIMMetric,
    brain_psnr,
    brain_ssim,
    ms_ssim,
    ms_ssim_min_size,
)

__all__ = [
    "MAX_PSNR",
    "MS_SSIM_WEIGHTS",
    "BrainPSNRMetric",
    "BrainSSIMMetric",
    "CodebookUsageMetric",
    "MSSSIMMetric",
    "brain_psnr",
    "brain_ssim",
    "codebook_histogram",
    "codebook_perplexity",
    "codebook_usage",
    "ms_ssim",
    "ms_ssim_min_size",
]
