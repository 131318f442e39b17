"""Encode one BraTS case into stage-2 tokens with a stage-1 autoencoder: the ``encode_case`` of the token cache."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Compose
from torch import nn

from prod9_components.data.modalities import MODALITIES
from prod9_components.data.token_cache import seg_to_token_grid
from prod9_components.data.transforms import preprocessing, preprocessing_contract
from prod9_components.inference.sliding_window import (
    AutoencoderInferenceWrapper,
    SlidingWindowConfig,
)
from prod9_components.networks.export import load_network

__all__ = ["CaseTokenizer"]


class CaseTokenizer:
    """
    ``case -> arrays`` for :func:`prod9_components.data.token_cache.build_token_cache`.

    The four modalities and the mask are preprocessed JOINTLY (``data.transforms.preprocessing`` with
    ``k_divisible = f``), so they share one grid: the foreground crop comes from T1, the first image key. Each
    modality is then tokenized by ``AutoencoderInferenceWrapper.quantize_stage_2_inputs`` - the one function that
    maps an image to indices (DESIGN section 4, trap 1).

    Returns ``{"tokens": int16 (4, d, h, w) in order T1, T1ce, T2, FLAIR, "seg": uint8 (f*d, f*h, f*w),
    "seg_tokens": uint8 (d, h, w), "affine": float64 (4, 4), "intensity": float32 (4, 2)}``. A case without
    "seg" gets all-zero (background) masks.

    Args:
        autoencoder: an FSQ autoencoder (``fsq``, ``downsample_factor``, ``codebook_size`` <= 32768).
        sw_config: tiling of the encoder.
        spacing: voxel size in mm of the preprocessed grid.
        intensity_range: range the robust intensity scaling maps to (the autoencoder's training range).
        device: where the autoencoder runs.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        sw_config: SlidingWindowConfig | None = None,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        intensity_range: tuple[float, float] = (0.0, 1.0),
        device: str | torch.device = "cpu",
    ) -> None:
        if int(autoencoder.codebook_size) > np.iinfo(np.int16).max + 1:
            raise ValueError(f"codebook of {autoencoder.codebook_size} codes does not fit the int16 token cache")
        self.device = torch.device(device)
        self.autoencoder = autoencoder.to(self.device).eval()
        self.factor = int(autoencoder.downsample_factor)
        self.wrapper = AutoencoderInferenceWrapper(self.autoencoder, sw_config)
        self.spacing = tuple(float(s) for s in spacing)
        self.intensity_range = (float(intensity_range[0]), float(intensity_range[1]))
        self.preprocessing = preprocessing_contract(self.spacing, self.intensity_range)
        self.autoencoder_path: str | None = None
        self._pipelines: dict[bool, Compose] = {}

    @classmethod
    def from_export(
        cls,
        path: str | os.PathLike,
        sw_config: SlidingWindowConfig | None = None,
        expected_args: dict | None = None,
        device: str | torch.device = "cpu",
    ) -> CaseTokenizer:
        """Tokenizer of a stage-1 export, with the spacing and intensity range of its preprocessing contract."""
        autoencoder, record = load_network(path, expected_args)
        contract = record.get("preprocessing") or {}
        try:
            spacing, intensity_range = contract["spacing"], contract["intensity"]["range"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: the export has no preprocessing contract (spacing, intensity range)") from None
        tokenizer = cls(autoencoder, sw_config, spacing, tuple(intensity_range), device)
        tokenizer.preprocessing = dict(contract)
        tokenizer.autoencoder_path = os.path.abspath(os.fspath(path))
        return tokenizer

    @property
    def settings(self) -> dict:
        """What the tokens depend on besides the export and the preprocessing contract (for the cache key)."""
        return {"sliding_window": dataclasses.asdict(self.wrapper.sw_config), "margin": 2}

    @property
    def cache_metadata(self) -> dict:
        """Description stored in the cache's ``cache.json``."""
        return {"autoencoder_path": self.autoencoder_path, "preprocessing": self.preprocessing, **self.settings}

    def pipeline(self, with_seg: bool) -> Compose:
        if with_seg not in self._pipelines:
            self._pipelines[with_seg] = Compose(preprocessing(
                image_keys=MODALITIES, label_keys=("seg",) if with_seg else (), spacing=self.spacing,
                intensity_range=self.intensity_range, k_divisible=self.factor,
            ))
        return self._pipelines[with_seg]

    def preprocess(self, case: Mapping) -> dict:
        """The case's four modalities (and "seg" if present) on one preprocessed grid (MONAI dict)."""
        with_seg = "seg" in case
        return self.pipeline(with_seg)({k: case[k] for k in (*MODALITIES, *(("seg",) if with_seg else ()))})

    @torch.no_grad()
    def __call__(self, case: Mapping) -> dict[str, np.ndarray]:
        data = self.preprocess(case)
        self.autoencoder.eval()
        tokens = []
        for key in MODALITIES:
            image = data[key].as_tensor()[None].to(self.device)  # (1, 1, D, H, W)
            tokens.append(self.wrapper.quantize_stage_2_inputs(image)[0].cpu())
        tokens = torch.stack(tokens).numpy().astype(np.int16)
        grid = data[MODALITIES[0]].shape[1:]
        if "seg" in data:
            seg = data["seg"][0].as_tensor().cpu().numpy().astype(np.uint8)
        else:
            seg = np.zeros(grid, np.uint8)
        return {
            "tokens": tokens,
            "seg": seg,
            "seg_tokens": seg_to_token_grid(seg, self.factor),
            "affine": np.asarray(data[MODALITIES[0]].affine, np.float64),
            "intensity": np.stack([data[f"{k}_intensity"].numpy() for k in MODALITIES]).astype(np.float32),
        }

