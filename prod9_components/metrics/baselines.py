"""The trivial baselines every quality number is reported beside (DESIGN §9), and the verdict against them.

A model that does not beat a baseline that learns nothing (or fits a handful of numbers) has not learned:

- :func:`pool_baseline`: what an autoencoder with downsampling factor ``f`` must beat — average-pool by ``f`` and
  interpolate back (trilinear). It keeps exactly as many numbers per volume as one latent channel does.
- :class:`TranslationBaselines`: what a modality translation must beat besides copying the source — the source
  histogram-matched to the target's training distribution, and a polynomial of the source intensities fitted by
  least squares on the training split (a cubic of T1 already inverts the T1 -> T2 contrast).
- :class:`BaselineVerdict`: an Ignite metric, attached after the scores it reads, that stores the best baseline of
  each score, the model's margin over it, and ``1.0`` when the model beats the best baseline on every score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from prod9_components.metrics.derived import DerivedMetric

__all__ = ["BaselineVerdict", "TranslationBaselines", "pool_baseline"]


def pool_baseline(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool by ``factor`` and interpolate back (trilinear): a reconstruction that learned nothing.

    Args:
        image: (B, C, D, H, W); a side that ``factor`` does not divide has a smaller last cell.
        factor: the autoencoder's total downsampling.

    Returns:
        (B, C, D, H, W) float32.
    """
    image = image.float()
    if factor <= 1:
        return image.clone()
    pooled = F.avg_pool3d(image, kernel_size=factor, stride=factor, ceil_mode=True)
    return F.interpolate(pooled, size=image.shape[2:], mode="trilinear", align_corners=False)


class TranslationBaselines:
    """Source -> target intensity maps fitted on training pairs (voxels inside the target's brain).

    - ``histogram``: each volume's first-source brain intensities mapped quantile to quantile onto the target
      modality's pooled training quantiles (classic histogram matching: monotone, so it cannot invert a contrast).
    - ``regression``: ``target ~ c0 + sum_s sum_k c_sk * source_s^k`` (k = 1..degree, no cross terms), least squares.

    Both predict the background value outside the sources' foreground and clamp to the intensity range.

    Args:
        degree: polynomial degree of the regression (3: a cubic).
        num_quantiles: quantile levels of the histogram map.
        intensity_range: (background, maximum) of the preprocessed images.
        max_voxels: voxels drawn (seeded) from the training brains for the fit.
    """

    def __init__(self, degree: int = 3, num_quantiles: int = 256, intensity_range: Sequence[float] = (0.0, 1.0),
                 max_voxels: int = 2_000_000) -> None:
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        self.degree, self.num_quantiles, self.max_voxels = int(degree), int(num_quantiles), int(max_voxels)
        self.low, self.high = (float(v) for v in intensity_range)
        self.coefficients: torch.Tensor | None = None  # (1 + S * degree,)
        self.target_quantiles: torch.Tensor | None = None  # (num_quantiles,)

    @property
    def levels(self) -> torch.Tensor:
        return (torch.arange(self.num_quantiles, dtype=torch.float64) + 0.5) / self.num_quantiles

    def fit(self, sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> TranslationBaselines:
        """Fit both maps on training volumes.

        Args:
            sources: per case (S, D, H, W), the source modalities on the case's grid.
            targets: per case (1, D, H, W) or (D, H, W), the target modality on the same grid.
        """
        if not sources or len(sources) != len(targets):
            raise ValueError(f"need one target per source volume and at least one pair, got {len(sources)} sources "
                             f"and {len(targets)} targets")
        x, y = [], []
        for source, target in zip(sources, targets):
            target = target.reshape(target.shape[-3:]).double()
            source = source.reshape(-1, *target.shape).double()
            brain = target > self.low
            x.append(source[:, brain].T)
            y.append(target[brain])
        x, y = torch.cat(x), torch.cat(y)
        if len(y) < 2 * (1 + x.shape[1] * self.degree):
            raise ValueError(f"only {len(y)} brain voxels in the training targets: too few to fit a degree-"
                             f"{self.degree} map")
        if len(y) > self.max_voxels:  # a seeded subset: the same fit every run
            keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: self.max_voxels]
            x, y = x[keep], y[keep]
        self.coefficients = torch.linalg.lstsq(self._features(x), y[:, None]).solution[:, 0]
        self.target_quantiles = _quantiles(y, self.levels)
        return self

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, S) intensities -> (N, 1 + S * degree) polynomial features, scaled to [0, 1] for conditioning."""
        x = (x - self.low) / (self.high - self.low)
        return torch.cat([torch.ones_like(x[:, :1]), *[x**k for k in range(1, self.degree + 1)]], dim=1)

    def _check_fitted(self) -> None:
        if self.coefficients is None:
            raise RuntimeError("TranslationBaselines: call fit() on training volumes first")

    def _apply(self, source: torch.Tensor, values: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
        out = torch.full(source[:, :1].shape, self.low, dtype=torch.float64)
        out[foreground] = values
        return out.clamp(self.low, self.high).float().to(source.device)

    def regression(self, source: torch.Tensor) -> torch.Tensor:
        """(B, S, D, H, W) sources -> (B, 1, D, H, W) target predicted by the fitted polynomial."""
        self._check_fitted()
        if source.shape[1] * self.degree + 1 != len(self.coefficients):
            raise ValueError(f"fitted on {(len(self.coefficients) - 1) // self.degree} source modalities, got "
                             f"{source.shape[1]}")
        source_cpu = source.detach().double().cpu()
        foreground = (source_cpu > self.low).any(dim=1, keepdim=True)
        x = source_cpu.movedim(1, -1)[foreground[:, 0]]  # (N, S)
        return self._apply(source, self._features(x) @ self.coefficients, foreground)

    def histogram(self, source: torch.Tensor) -> torch.Tensor:
        """(B, S, D, H, W) sources -> (B, 1, D, H, W): the first source's brain histogram matched, per volume, to
        the target's training histogram."""
        self._check_fitted()
        first = source[:, :1].detach().double().cpu()
        foreground = first > self.low
        out = torch.full_like(first, self.low)
        for b in range(len(first)):
            values = first[b][foreground[b]]
            if values.numel() == 0:
                continue
            own = _quantiles(values, self.levels)
            out[b][foreground[b]] = _interp(values, own, self.target_quantiles)
        return out.clamp(self.low, self.high).float().to(source.device)

    def state_dict(self) -> dict:
        """JSON-able fit (for a record or a log)."""
        self._check_fitted()
        return {"degree": self.degree, "intensity_range": [self.low, self.high],
                "coefficients": self.coefficients.tolist(), "target_quantiles": self.target_quantiles.tolist()}


def _quantiles(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    ordered = values.reshape(-1).sort().values
    return ordered[(levels * (ordered.numel() - 1)).round().long()]


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``x -> f`` through the points ``(xp, fp)`` (``xp`` ascending, ties allowed), constant
    beyond the ends: numpy's ``interp`` in torch."""
    index = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[index - 1], xp[index], fp[index - 1], fp[index]
    weight = ((x - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0.0, 1.0)
    return f0 + weight * (f1 - f0)


class BaselineVerdict(DerivedMetric):
    """Does the model beat the best trivial baseline on every score? Reads ``engine.state.metrics`` at epoch end.

    For each score ``s`` (e.g. ``psnr``) and baseline prefix ``b`` (e.g. ``pool_baseline``) it reads ``s`` and
    ``b_s`` and stores ``best_baseline_<s>`` (the best baseline value) and ``margin_<s>`` (model - best; for a
    lower-is-better score, best - model, so a positive margin always means the model wins). The metric's own value
    is 1.0 when every margin is > 0, else 0.0. Scores that are NaN or absent (e.g. ``psnr_tumour`` on a split with no
    tumour) are skipped; with none left the verdict is NaN.

    Attach it AFTER the metrics it reads: put it last in ``additional_metrics``.

    Args:
        scores: names of the model's scores.
        baselines: prefixes of the baselines' scores (``"<prefix>_<score>"``).
        higher_is_better: direction of every score.
    """

    def __init__(self, scores: Sequence[str] = ("psnr", "ssim"), baselines: Sequence[str] = ("pool_baseline",),
                 higher_is_better: bool = True) -> None:
        if not scores or not baselines:
            raise ValueError("BaselineVerdict needs at least one score and one baseline")
        self.scores, self.baselines, self.higher_is_better = list(scores), list(baselines), bool(higher_is_better)
        super().__init__()

    def verdict(self, metrics: dict) -> dict[str, float]:
        """``{"best_baseline_<s>", "margin_<s>", ..., "beats": 1.0 / 0.0 / NaN}`` of a dict of metric values."""
        out, wins = {}, []
        for score in self.scores:
            model = _value(metrics.get(score))
            values = [_value(metrics.get(f"{b}_{score}")) for b in self.baselines]
            values = [v for v in values if not math.isnan(v)]
            if math.isnan(model) or not values:
                continue
            best = max(values) if self.higher_is_better else min(values)
            margin = model - best if self.higher_is_better else best - model
            out[f"best_baseline_{score}"], out[f"margin_{score}"] = best, margin
            wins.append(margin > 0)
        out["beats"] = float(all(wins)) if wins else math.nan
        return out

    def derive(self, metrics: dict) -> tuple[float, dict[str, float]]:
        result = self.verdict(metrics)
        return result.pop("beats"), result


def _value(value) -> float:
    if value is None:
        return math.nan
    return float(value.item() if hasattr(value, "item") else value)
