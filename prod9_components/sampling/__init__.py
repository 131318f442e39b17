"""Samplers and mask schedules of the generative stages."""

from prod9_components.sampling.maskgit import MaskGiTSampler, guided_logits
from prod9_components.sampling.schedules import SCHEDULES, mask_ratio, sample_training_mask

__all__ = ["SCHEDULES", "MaskGiTSampler", "guided_logits", "mask_ratio", "sample_training_mask"]
