"""Region-specific contrastive loss for a mask-steered ControlNet (after MAISI-v2's): inside the tumour, the velocity
predicted with the case's mask must differ from the one predicted with the tumour removed by at least a margin.

The velocity loss alone lets a ControlNet ignore a small region (a tumour is a few percent of the brain); this hinge
pushes the prediction in that region to depend on the mask. Cases without a tumour contribute nothing. The same
tumour cells, weighted, are what both families' ``tumour_weight`` up-weights in their training losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tumour_region(seg: torch.Tensor, latent_grid: tuple[int, ...]) -> torch.Tensor:
    """Latent cells that hold any tumour voxel: (B, 1, d, h, w) float {0, 1} of a mask (B, D, H, W) or
    (B, 1, D, H, W), D = f * d."""
    tumour = (seg.reshape(seg.shape[0], 1, *seg.shape[-3:]) > 0).float()
    return F.adaptive_max_pool3d(tumour, latent_grid)


def tumour_weights(seg: torch.Tensor, latent_grid: tuple[int, ...], weight: float) -> torch.Tensor:
    """(B, 1, d, h, w): ``weight`` in the cells of :func:`tumour_region`, 1 elsewhere (a loss's per-cell weights)."""
    return 1.0 + (float(weight) - 1.0) * tumour_region(seg, latent_grid)


def region_contrastive_loss(velocity: torch.Tensor, velocity_without: torch.Tensor, region: torch.Tensor,
                            margin: float) -> torch.Tensor:
    """Mean over the batch of ``relu(margin - mean |v - v_without| inside the region)``; 0 for a sample without a
    region, so exactly 0 when no sample has a tumour.

    Args:
        velocity: (B, C, d, h, w) predicted with the case's mask.
        velocity_without: (B, C, d, h, w) predicted from the same input with the tumour removed from the mask.
        region: (B, 1, d, h, w) {0, 1} from :func:`tumour_region`.
        margin: the mean absolute difference (in velocity units) above which a region is not penalised.
    """
    if margin < 0:
        raise ValueError(f"contrastive margin must be >= 0, got {margin}")
    difference = (velocity.float() - velocity_without.float()).abs().mean(dim=1, keepdim=True)
    cells = region.flatten(1).sum(1)
    inside = (difference * region).flatten(1).sum(1) / cells.clamp(min=1)
    hinge = torch.where(cells > 0, F.relu(margin - inside), torch.zeros_like(inside))
    return hinge.mean()
