"""Ignite evaluator for autoencoders: whole volumes through the sliding window.

One pass encodes the volume tile by tile and decodes it again; the output carries the reconstruction (``pred``),
the target (``label``, the input itself), the trivial baseline it must beat (``pool_baseline``: the input
average-pooled by the network's downsampling factor and interpolated back) and, for FSQ autoencoders, the token
``indices`` that codebook metrics count. The same evaluator serves validation during training, ``validate``/``test`` and ``infer`` (with
postprocessing that inverts the preprocessing and writes NIfTI).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from torch import nn

from prod9_components.engines.base_trainer import cuda_amp
from prod9_components.inference.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig
from prod9_components.metrics.baselines import pool_baseline
from prod9_components.networks.export import unwrap


class AutoencoderEvaluator(Evaluator):
    """Reconstruct every validation volume with :class:`AutoencoderInferenceWrapper`.

    Args:
        device: where the network lives.
        val_data_loader: yields dicts with ``"image"`` of shape (B, 1, D, H, W).
        network: the autoencoder (possibly DDP-wrapped).
        sw_config: sliding-window settings.
        epoch_length: iterations per run, None for the whole loader.
        postprocessing: MONAI transforms applied to each decollated item (inversion, saving).
        key_val_metric / additional_metrics / val_handlers: as in MONAI's ``Evaluator``.
        amp: autocast on CUDA only.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        network: nn.Module,
        sw_config: SlidingWindowConfig,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        postprocessing: Callable | None = None,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
    ) -> None:
        amp = cuda_amp(amp, device)
        kwargs = {"metric_cmp_fn": metric_cmp_fn} if metric_cmp_fn is not None else {}
        super().__init__(device=device, val_data_loader=val_data_loader, epoch_length=epoch_length,
                         non_blocking=non_blocking, postprocessing=postprocessing, key_val_metric=key_val_metric,
                         additional_metrics=additional_metrics, val_handlers=val_handlers, amp=amp, **kwargs)
        self.network = network
        self.sw_config = sw_config

    def _iteration(self, engine: AutoencoderEvaluator, batchdata: dict) -> dict:
        images = batchdata["image"].to(engine.state.device, non_blocking=engine.non_blocking)
        autoencoder = unwrap(self.network)
        wrapper = AutoencoderInferenceWrapper(autoencoder, self.sw_config)
        output = {"image": images, "label": images,
                  "pool_baseline": pool_baseline(images, int(autoencoder.downsample_factor))}
        with engine.mode(autoencoder), torch.no_grad(), torch.autocast("cuda", enabled=self.amp):
            latent = wrapper.encode(images)
            output["pred"] = wrapper.decode(latent)[(...,) + tuple(slice(0, s) for s in images.shape[2:])].float()
            if hasattr(autoencoder, "fsq"):
                output["indices"] = autoencoder.fsq.quantize(latent)
        # MONAI decollates and postprocesses on MODEL_COMPLETED, reading engine.state.output.
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
