"""Encode one BraTS case into stage-2 tokens with a stage-1 autoencoder: the ``encode_case`` of the token cache."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from prod9_components.data.token_cache import seg_to_token_grid
from prod9_components.engines.case_encoder import CaseEncoder

__all__ = ["CaseTokenizer"]


class CaseTokenizer(CaseEncoder):
    """
    ``case -> arrays`` for :func:`prod9_components.data.token_cache.build_token_cache`.

    Each jointly preprocessed modality (:class:`CaseEncoder`) is tokenized by
    ``AutoencoderInferenceWrapper.quantize_stage_2_inputs`` - the one function that maps an image to indices
    (DESIGN section 4, trap 1).

    Returns ``{"tokens": int16 (4, d, h, w) in order T1, T1ce, T2, FLAIR, "seg": uint8 (f*d, f*h, f*w),
    "seg_tokens": uint8 (d, h, w), "affine": float64 (4, 4), "intensity": float32 (4, 2)}``. A case without
    "seg" gets all-zero (background) masks.

    Args: as :class:`CaseEncoder`; the autoencoder is an FSQ autoencoder (``fsq``, ``codebook_size`` <= 32768).
    """

    def __init__(self, autoencoder, *args, **kwargs) -> None:
        if int(autoencoder.codebook_size) > np.iinfo(np.int16).max + 1:
            raise ValueError(f"codebook of {autoencoder.codebook_size} codes does not fit the int16 token cache")
        super().__init__(autoencoder, *args, **kwargs)

    @torch.no_grad()
    def __call__(self, case: Mapping) -> dict[str, np.ndarray]:
        data = self.preprocess(case)
        self.autoencoder.eval()
        tokens = torch.stack([self.wrapper.quantize_stage_2_inputs(image)[0].cpu() for image in self.images(data)])
        shared = self.shared_arrays(data)
        return {"tokens": tokens.numpy().astype(np.int16), "seg_tokens": seg_to_token_grid(shared["seg"], self.factor),
                **shared}
