"""Image-quality metrics of generated or reconstructed brain volumes: PSNR and SSIM inside the brain, and MS-SSIM.

Functional forms return one value per sample; the ``*Metric`` classes are MONAI ``CumulativeIterationMetric``s, so
they plug into ``IgniteMetricHandler(metric_fn=..., output_transform=from_engine(["pred", "label"]))``.

Choices:
- ``pred`` is not clipped to the data range: a reconstruction that overshoots is penalised for it.
- The brain is ``target > 0`` unless a mask is given (preprocessing maps the background to exactly 0).
- PSNR of a perfect prediction is capped at ``MAX_PSNR`` (100 dB) instead of inf, so means stay finite.
- A sample with an empty mask scores NaN; MONAI's reductions skip NaNs.
- For a tumour-only score, pass ``mask`` to the functions; through the ``IgniteMetricHandler`` (which only
  forwards ``(y_pred, y)``), zero both volumes outside the tumour in ``output_transform``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.metrics import CumulativeIterationMetric, MultiScaleSSIMMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

MAX_PSNR = 100.0
# Wang et al. 2003 weights of the three finest scales, renormalised to sum to 1: five scales would need 256^3.
MS_SSIM_WEIGHTS = (0.0711, 0.4530, 0.4759)


def _brain_mask(target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        mask = target > 0
    return mask.to(dtype=torch.float32).expand_as(target)


def _gaussian_window(kernel_size: int, sigma: float) -> torch.Tensor:
    """(kernel_size,): the normalised 1D Gaussian whose outer cube is MONAI's SSIM window."""
    offsets = torch.arange(kernel_size) - (kernel_size - 1) / 2
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def ssim_and_cs(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    kernel_size: int = 7,
    kernel_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSIM and contrast-sensitivity maps of MONAI's ``compute_ssim_and_cs`` (3D, Gaussian window), to float
    rounding, computed 7x faster on CPU: the window is separable, so each of the five local moments is filtered along
    one axis at a time (3k taps a voxel instead of k^3), all five in one batch. MONAI filters them one by one with
    the whole cube, which a single volume sends down torch's slowest convolution path.

    Args:
        pred, target: (B, C, D, H, W).
        data_range / kernel_size / kernel_sigma / k1 / k2: as MONAI's.

    Returns:
        ``(ssim, cs)``, each (B, C, D - k + 1, H - k + 1, W - k + 1): only the windows that fit in the volume.
    """
    if pred.shape != target.shape or pred.dim() != 5:
        raise ValueError(f"pred and target must be (B, C, D, H, W) of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}.")
    pred, target = pred.float(), target.float()
    moments = torch.stack([pred, target, pred * pred, target * target, pred * target])  # (5, B, C, D, H, W)
    means = moments.reshape(-1, 1, *target.shape[2:])
    window = _gaussian_window(kernel_size, kernel_sigma).to(means)
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel_size
        means = F.conv3d(means, window.reshape(shape))
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = means.reshape(5, *target.shape[:2], *means.shape[2:])
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    cs = (2 * (mu_xy - mu_x * mu_y) + c2) / (mu_xx - mu_x * mu_x + mu_yy - mu_y * mu_y + c2)
    return (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs, cs


def brain_psnr(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, data_range: float = 1.0
) -> torch.Tensor:
    """PSNR over the voxels inside ``mask``, per sample: ``10 * log10(data_range^2 / mse)``, capped at 100 dB.

    Args:
        pred: prediction, (B, C, D, H, W).
        target: reference, same shape.
        mask: region to score, broadcastable to ``target`` (e.g. (B, 1, D, H, W)); default ``target > 0``.
        data_range: intensity range of the images.

    Returns:
        (B,) PSNR in dB (NaN where the mask is empty).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}.")
    weight = _brain_mask(target, mask).flatten(1)
    squared_error = (pred.float() - target.float()).square().flatten(1)
    mse = (weight * squared_error).sum(dim=1) / weight.sum(dim=1)  # 0/0 -> NaN for an empty mask
    floor = data_range**2 * 10 ** (-MAX_PSNR / 10)  # the mse at which PSNR reaches the cap
    return 10 * torch.log10(data_range**2 / mse.clamp_min(floor))


def brain_ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    data_range: float = 1.0,
    kernel_size: int = 7,
    kernel_sigma: float = 1.5,
) -> torch.Tensor:
    """SSIM map (MONAI's Gaussian-window computation, see :func:`ssim_and_cs`) averaged inside ``mask``, per sample.

    The SSIM map only covers window centres that fit in the volume (each side loses ``(kernel_size - 1) // 2``
    voxels), so the mask is cropped to the same region.

    Args:
        pred: prediction, (B, C, D, H, W), every side >= ``kernel_size``.
        target: reference, same shape.
        mask: region to score, broadcastable to ``target``; default ``target > 0``.
        data_range: intensity range of the images.
        kernel_size: side of the Gaussian window.
        kernel_sigma: standard deviation of the Gaussian window.

    Returns:
        (B,) SSIM (NaN where the cropped mask is empty).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}.")
    if min(target.shape[2:]) < kernel_size:
        raise ValueError(f"every spatial side must be >= kernel_size={kernel_size}, got {tuple(target.shape[2:])}.")
    ssim_map, _ = ssim_and_cs(pred, target, data_range, kernel_size, kernel_sigma)
    start = (kernel_size - 1) // 2
    crop = tuple(slice(start, start + n) for n in ssim_map.shape[2:])
    weight = _brain_mask(target, mask)[(slice(None), slice(None), *crop)].flatten(1)
    return (weight * ssim_map.flatten(1)).sum(dim=1) / weight.sum(dim=1)


def ms_ssim_min_size(kernel_size: int = 7, num_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """Smallest spatial side MONAI's MS-SSIM accepts.

    MONAI 1.6.1 requires ``side // (num_scales - 1) ** 2 > kernel_size - 1`` (note: a square, not ``2 **``).
    With the defaults (7, 3 scales) that is 28, so 32^3 volumes work.
    """
    divisor = max(1, num_scales - 1) ** 2
    return kernel_size * divisor


def ms_ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    kernel_size: int = 7,
    kernel_sigma: float = 1.5,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
) -> torch.Tensor:
    """Multi-scale SSIM over the whole volume, per sample: MONAI's ``compute_ms_ssim`` (to float rounding) on
    :func:`ssim_and_cs`.

    The default (kernel 7, three scales) needs every spatial side >= 28 (see ``ms_ssim_min_size``).

    Args:
        pred: prediction, (B, C, D, H, W).
        target: reference, same shape.
        data_range: intensity range of the images.
        kernel_size: side of the Gaussian window.
        kernel_sigma: standard deviation of the Gaussian window.
        weights: one exponent per scale, finest first.

    Returns:
        (B,) MS-SSIM.
    """
    _check_ms_ssim_size(target.shape, kernel_size, len(weights))
    factors = []  # per scale, finest first: the mean contrast sensitivity, at the coarsest the mean SSIM
    for scale in range(len(weights)):
        if scale:
            pred, target = F.avg_pool3d(pred, 2), F.avg_pool3d(target, 2)
        ssim, cs = ssim_and_cs(pred, target, data_range, kernel_size, kernel_sigma)
        factors.append((ssim if scale == len(weights) - 1 else cs).flatten(1).mean(1).relu())
    return torch.prod(torch.stack(factors) ** torch.tensor(weights, device=target.device).view(-1, 1), dim=0)


def _check_ms_ssim_size(shape: Sequence[int], kernel_size: int, num_scales: int) -> None:
    smallest = ms_ssim_min_size(kernel_size, num_scales)
    if len(shape) != 5 or min(shape[2:]) < smallest:
        raise ValueError(
            f"MS-SSIM with kernel_size={kernel_size} and {num_scales} scales needs (B, C, D, H, W) input with every "
            f"spatial side >= {smallest}, got {tuple(shape)}."
        )


class _ReducedMetric(CumulativeIterationMetric):
    """Cumulative metric whose buffer holds one (B, 1) value per sample and aggregates with a MONAI reduction."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def aggregate(self, reduction: MetricReduction | str | None = None):  # type: ignore[override]
        """Reduce the buffer (default: mean over samples, NaNs skipped) to a scalar tensor."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        value, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (value, not_nans) if self.get_not_nans else value


class BrainPSNRMetric(_ReducedMetric):
    """Cumulative ``brain_psnr`` (y_pred = prediction, y = target; brain = ``y > 0``).

    Args:
        data_range: intensity range of the images.
        reduction: MONAI reduction of the per-sample values; ``aggregate()`` gives a scalar with "mean".
        get_not_nans: also return the count of non-NaN values.
    """

    def __init__(
        self,
        data_range: float = 1.0,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        self.data_range = data_range

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if y is None:
            raise ValueError("BrainPSNRMetric needs y (the target).")
        return brain_psnr(y_pred, y, data_range=self.data_range).unsqueeze(1)


class BrainSSIMMetric(_ReducedMetric):
    """Cumulative ``brain_ssim`` (y_pred = prediction, y = target; brain = ``y > 0``).

    Args:
        data_range: intensity range of the images.
        kernel_size: side of the Gaussian window.
        kernel_sigma: standard deviation of the Gaussian window.
        reduction: MONAI reduction of the per-sample values.
        get_not_nans: also return the count of non-NaN values.
    """

    def __init__(
        self,
        data_range: float = 1.0,
        kernel_size: int = 7,
        kernel_sigma: float = 1.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        self.data_range = data_range
        self.kernel_size = kernel_size
        self.kernel_sigma = kernel_sigma

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if y is None:
            raise ValueError("BrainSSIMMetric needs y (the target).")
        value = brain_ssim(
            y_pred, y, data_range=self.data_range, kernel_size=self.kernel_size, kernel_sigma=self.kernel_sigma
        )
        return value.unsqueeze(1)


class MSSSIMMetric(MultiScaleSSIMMetric):
    """MONAI ``MultiScaleSSIMMetric`` for 3D volumes with defaults that work from 28^3 up (kernel 7, three scales),
    computed by :func:`ms_ssim`.

    Args:
        data_range: intensity range of the images.
        kernel_size: side of the Gaussian window.
        kernel_sigma: standard deviation of the Gaussian window.
        weights: one exponent per scale, finest first.
        reduction: MONAI reduction of the per-sample values.
        get_not_nans: also return the count of non-NaN values.
    """

    def __init__(
        self,
        data_range: float = 1.0,
        kernel_size: int = 7,
        kernel_sigma: float = 1.5,
        weights: Sequence[float] = MS_SSIM_WEIGHTS,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(
            spatial_dims=3,
            data_range=data_range,
            kernel_size=kernel_size,
            kernel_sigma=kernel_sigma,
            weights=weights,
            reduction=reduction,
            get_not_nans=get_not_nans,
        )

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ms_ssim(y_pred, y, self.data_range, self.kernel_size[0], self.kernel_sigma[0], self.weights)[:, None]



def _pair(first: str, region: str | None = None):
    """``output -> (output[first], output["label"])``, both zeroed outside ``output[region]`` when given."""
    def transform(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if region is None:
            return output[first], output["label"]
        return output[first] * output[region], output["label"] * output[region]
    return transform


TRANSLATION_BASELINES = ("copy_source", "histogram_source", "regression_source")
TRANSLATION_SCORES = ("psnr", "ssim", "psnr_tumour", "ssim_tumour")


def translation_metrics() -> dict:
    """The BraSyn-style scores of a translation beside its trivial baselines (DESIGN §9), as Ignite metrics for an
    evaluator's ``additional_metrics``, reading the evaluator's output keys:

    - ``psnr`` / ``ssim`` of ``pred`` vs ``label`` in the brain, ``psnr_tumour`` / ``ssim_tumour`` inside ``tumour``;
    - the same four scores of each baseline: ``copy_source_*`` (the source itself, key ``source``),
      ``histogram_source_*`` and ``regression_source_*`` (the source histogram-matched to, and a polynomial of the
      source intensities fitted on, the training split's target: :mod:`~prod9_components.metrics.baselines`);
    - ``roundtrip_psnr`` / ``roundtrip_ssim`` of ``roundtrip`` (the autoencoder's round trip: the upper bound);
    - last, ``beats_baselines`` (1.0 when the translation beats the best baseline on all four scores) with
      ``best_baseline_<score>`` and ``margin_<score>``.
    """
    from monai.handlers import IgniteMetricHandler  # ignite is only needed where evaluators run

    from prod9_components.metrics.baselines import BaselineVerdict

    metric = {"psnr": BrainPSNRMetric, "ssim": BrainSSIMMetric}
    metrics = {}
    for prefix, key in (("", "pred"), *((f"{b}_", "source" if b == "copy_source" else b)
                                        for b in TRANSLATION_BASELINES)):
        for score in TRANSLATION_SCORES:
            kind, _, region = score.partition("_")
            metrics[prefix + score] = IgniteMetricHandler(metric[kind](),
                                                          output_transform=_pair(key, "tumour" if region else None))
    for kind in ("psnr", "ssim"):
        metrics[f"roundtrip_{kind}"] = IgniteMetricHandler(metric[kind](), output_transform=_pair("roundtrip"))
    metrics["beats_baselines"] = BaselineVerdict(TRANSLATION_SCORES, TRANSLATION_BASELINES)
    return metrics


def reconstruction_baseline_metrics() -> dict:
    """An autoencoder's trivial baseline (DESIGN §9) for an evaluator's ``additional_metrics``, placed after its
    ``psnr`` / ``ssim`` / ``ms_ssim``: the same three scores of ``pool_baseline`` (the input average-pooled by the
    downsampling factor, trilinear back), then ``beats_baselines`` with ``best_baseline_<score>`` and
    ``margin_<score>``."""
    from monai.handlers import IgniteMetricHandler, from_engine

    from prod9_components.metrics.baselines import BaselineVerdict

    pair = from_engine(["pool_baseline", "label"])
    return {
        "pool_baseline_psnr": IgniteMetricHandler(BrainPSNRMetric(), output_transform=pair),
        "pool_baseline_ssim": IgniteMetricHandler(BrainSSIMMetric(), output_transform=pair),
        "pool_baseline_ms_ssim": IgniteMetricHandler(MSSSIMMetric(), output_transform=pair),
        "beats_baselines": BaselineVerdict(("psnr", "ssim", "ms_ssim"), ("pool_baseline",)),
    }
