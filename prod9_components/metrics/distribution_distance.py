"""Distances between the voxel statistics of generated and real volumes that need no pretrained network.

No feature network can be downloaded here, so instead of an FID-like score these compare 1-D distributions:
the intensities of all voxels, and the gradient magnitudes (edges and texture), pooled over volumes. Each is the
Wasserstein-1 distance (earth mover's distance, in intensity units) between the two empirical distributions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["gradient_magnitude", "intensity_distances", "wasserstein_1d"]


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor, num_quantiles: int = 1024) -> float:
    """W1 between the empirical distributions of ``a`` and ``b`` (any shapes): mean |quantile_a - quantile_b| over
    ``num_quantiles`` evenly spaced levels (exact for equal-size samples as the count grows)."""
    levels = (torch.arange(num_quantiles, dtype=torch.float64) + 0.5) / num_quantiles
    qa = _quantiles(a.detach().reshape(-1).double().cpu(), levels)
    qb = _quantiles(b.detach().reshape(-1).double().cpu(), levels)
    return float((qa - qb).abs().mean())


def _quantiles(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    # torch.quantile refuses more than 16M values; sorting and indexing has no such limit.
    ordered = values.sort().values
    return ordered[(levels * (ordered.numel() - 1)).round().long()]


def gradient_magnitude(volume: torch.Tensor) -> torch.Tensor:
    """|central-difference gradient| of a (..., D, H, W) volume, (..., D-2, H-2, W-2)."""
    v = volume.float()
    gd = (v[..., 2:, 1:-1, 1:-1] - v[..., :-2, 1:-1, 1:-1]) / 2
    gh = (v[..., 1:-1, 2:, 1:-1] - v[..., 1:-1, :-2, 1:-1]) / 2
    gw = (v[..., 1:-1, 1:-1, 2:] - v[..., 1:-1, 1:-1, :-2]) / 2
    return (gd.square() + gh.square() + gw.square()).sqrt()


def intensity_distances(generated: Sequence[torch.Tensor], real: Sequence[torch.Tensor]) -> dict[str, float]:
    """``{"intensity_w1", "gradient_w1"}`` between pooled generated and pooled real volumes.

    Args:
        generated / real: volumes (1, D, H, W) on one intensity scale; each side pooled over its volumes. Compare
            volumes of the same size and framing (pad real volumes to the generated grid with background), so the
            share of background voxels matches.
    """
    if not generated or not real:
        raise ValueError("intensity_distances needs at least one generated and one real volume")
    gen = torch.cat([g.float().reshape(-1) for g in generated])
    ref = torch.cat([r.float().reshape(-1) for r in real])
    gen_grad = torch.cat([gradient_magnitude(g).reshape(-1) for g in generated])
    ref_grad = torch.cat([gradient_magnitude(r).reshape(-1) for r in real])
    return {"intensity_w1": wasserstein_1d(gen, ref), "gradient_w1": wasserstein_1d(gen_grad, ref_grad)}
