"""Encode one BraTS case with a stage-1 network: the ``encode_case`` of the token and latent caches."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Compose
from torch import nn

from prod9_components.data.modalities import MODALITIES
from prod9_components.data.transforms import preprocessing, preprocessing_contract
from prod9_components.inference.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig
from prod9_components.limits import check_voxels, voxel_count
from prod9_components.networks.export import build_network, read_record

__all__ = ["CaseEncoder", "CaseLatentEncoder"]


class CaseEncoder:
    """
    The shared half of ``case -> arrays``: preprocessing and the tiled autoencoder.

    The four modalities and the mask are preprocessed JOINTLY (``data.transforms.preprocessing`` with
    ``k_divisible = f``), so they share one grid: the foreground crop comes from T1, the first image key.
    Subclasses encode each preprocessed modality (``__call__``).

    Args:
        autoencoder: a stage-1 autoencoder (``downsample_factor``, ``encode``, ``decode``).
        sw_config: tiling of the encoder.
        spacing: voxel size in mm of the preprocessed grid.
        intensity_range: range the robust intensity scaling maps to (the autoencoder's training range).
        device: where the autoencoder runs.
        latent_size: a fixed latent canvas (d, h, w): every case is centre-padded with background to
            ``f * latent_size`` voxels BEFORE encoding (a case that does not fit raises, naming it). MAISI's
            diffusion model needs one latent size; padding the latent instead decodes 7-8 dB (its edge replicated)
            or 4-6 dB (the background's latent) worse than the VAE's own round trip on the demo (the decoder reads
            the volume's edge from the latent). None: each case on its own grid.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        sw_config: SlidingWindowConfig | None = None,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        intensity_range: tuple[float, float] = (0.0, 1.0),
        device: str | torch.device = "cpu",
        latent_size: Sequence[int] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.autoencoder = autoencoder.to(self.device).eval()
        self.factor = int(autoencoder.downsample_factor)
        self.wrapper = AutoencoderInferenceWrapper(self.autoencoder, sw_config)
        self.spacing = tuple(float(s) for s in spacing)
        self.intensity_range = (float(intensity_range[0]), float(intensity_range[1]))
        self.preprocessing = preprocessing_contract(self.spacing, self.intensity_range)
        self.latent_size = None if latent_size is None else [int(n) for n in latent_size]
        if self.latent_size is not None:  # it comes from a checkpoint (data): refuse a canvas that cannot be allocated
            if len(self.latent_size) != 3 or min(self.latent_size) < 1:
                raise ValueError(f"latent_size {list(latent_size)}: expected three positive sizes (d, h, w)")
            check_voxels(voxel_count(self.image_size), f"latent canvas {self.image_size} (latent_size "
                         f"{self.latent_size} x {self.factor})", "is this the diffusion checkpoint you trained?")
        self.autoencoder_path: str | None = None
        self.autoencoder_sha256: str | None = None
        self._pipelines: dict[bool, Compose] = {}

    @classmethod
    def from_export(
        cls,
        path: str | os.PathLike,
        sw_config: SlidingWindowConfig | None = None,
        expected_args: dict | None = None,
        device: str | torch.device = "cpu",
        latent_size: Sequence[int] | None = None,
    ) -> CaseEncoder:
        """Encoder of a stage-1 export, with the spacing and intensity range of its preprocessing contract.

        ``autoencoder_sha256`` is the hash of the bytes the network was built from (the cache key's input).
        """
        record, sha256 = read_record(path)
        autoencoder = build_network(record, expected_args, source=str(path))
        contract = record.get("preprocessing") or {}
        try:
            spacing, intensity_range = contract["spacing"], contract["intensity"]["range"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: the export has no preprocessing contract (spacing, intensity range)") from None
        encoder = cls(autoencoder, sw_config, spacing, tuple(intensity_range), device, latent_size)
        encoder.preprocessing = dict(contract)
        encoder.autoencoder_path = os.path.abspath(os.fspath(path))
        encoder.autoencoder_sha256 = sha256
        return encoder

    @property
    def settings(self) -> dict:
        """What the arrays depend on besides the export and the preprocessing contract (for the cache key)."""
        canvas = {} if self.latent_size is None else {"latent_size": self.latent_size}
        return {"sliding_window": dataclasses.asdict(self.wrapper.sw_config), "margin": 2, **canvas}

    @property
    def cache_metadata(self) -> dict:
        """Description stored in the cache's ``cache.json``."""
        return {"autoencoder_path": self.autoencoder_path, "preprocessing": self.preprocessing, **self.settings}

    def pipeline(self, with_seg: bool) -> Compose:
        if with_seg not in self._pipelines:
            self._pipelines[with_seg] = Compose(preprocessing(
                image_keys=MODALITIES, label_keys=("seg",) if with_seg else (), spacing=self.spacing,
                intensity_range=self.intensity_range, k_divisible=self.factor, spatial_size=self.image_size,
            ))
        return self._pipelines[with_seg]

    @property
    def image_size(self) -> list[int] | None:
        """The image canvas ``f * latent_size`` (None without one)."""
        return None if self.latent_size is None else [self.factor * n for n in self.latent_size]

    def preprocess(self, case: Mapping) -> dict:
        """The case's four modalities (and "seg" if present) on one preprocessed grid (MONAI dict).

        Raises:
            ValueError: naming the case when its grid does not fit the canvas ``image_size``.
        """
        with_seg = "seg" in case
        data = self.pipeline(with_seg)({k: case[k] for k in (*MODALITIES, *(("seg",) if with_seg else ()))})
        grid = list(data[MODALITIES[0]].shape[1:])
        if self.image_size is not None and grid != self.image_size:
            raise ValueError(f"case {case.get('case')}: its preprocessed grid {grid} is larger than the latent canvas "
                             f"{self.image_size} ({self.latent_size} latent cells x {self.factor}); the diffusion "
                             "model was trained on smaller volumes (another spacing or dataset?)")
        return data

    def shared_arrays(self, data: Mapping) -> dict[str, np.ndarray]:
        """``seg`` uint8 (D, H, W) (zeros for a case without a mask), ``affine`` and ``intensity`` of a
        preprocessed case."""
        grid = data[MODALITIES[0]].shape[1:]
        seg = data["seg"][0].as_tensor().cpu().numpy().astype(np.uint8) if "seg" in data else np.zeros(grid, np.uint8)
        return {
            "seg": seg,
            "affine": np.asarray(data[MODALITIES[0]].affine, np.float64),
            "intensity": np.stack([data[f"{k}_intensity"].numpy() for k in MODALITIES]).astype(np.float32),
        }

    def images(self, data: Mapping):
        """Each preprocessed modality as (1, 1, D, H, W) on the encoder's device, in order T1, T1ce, T2, FLAIR."""
        for key in MODALITIES:
            yield data[key].as_tensor()[None].to(self.device)


class CaseLatentEncoder(CaseEncoder):
    """``case -> {"latent": float32 (4, C, d, h, w), "seg", "affine", "intensity"}`` with a KL-VAE: the tiled latent
    MEAN of each modality (:meth:`AutoencoderInferenceWrapper.encode`), never a posterior sample, so the cache is
    deterministic. For :func:`prod9_components.data.latent_cache.build_latent_cache`."""

    @torch.no_grad()
    def __call__(self, case: Mapping) -> dict[str, np.ndarray]:
        data = self.preprocess(case)
        self.autoencoder.eval()
        latent = torch.stack([self.wrapper.encode(image)[0].float().cpu() for image in self.images(data)])
        return {"latent": latent.numpy(), **self.shared_arrays(data)}
