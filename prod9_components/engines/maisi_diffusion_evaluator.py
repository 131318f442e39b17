"""Ignite evaluator of a rectified-flow latent diffusion model: the velocity loss on held-out latents."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.networks.schedulers import RFlowScheduler
from torch import nn

from prod9_components.data.sharding import validation_generator
from prod9_components.engines.base_trainer import cuda_amp
from prod9_components.losses.rectified_flow import rectified_flow_loss


class RectifiedFlowEvaluator(Evaluator):
    """``val_loss`` of every held-out latent at noise and uniform timesteps drawn from ``seed`` and the item, so every
    validation sees the same noisy inputs and epochs compare. Samples and distribution distances come from a
    handler (:class:`~prod9_components.handlers.maisi_samples.MaisiSamplesHandler`).

    Args:
        device: where the network lives.
        val_data_loader: yields ``{"latent", "label"}`` as the trainer's loader.
        network: the model to score (the EMA copy during training).
        scheduler: the training ``RFlowScheduler``.
        seed: seed of the validation noise and timesteps.
        epoch_length / key_val_metric / additional_metrics / val_handlers: as in MONAI's ``Evaluator``.
        amp: bfloat16 autocast on CUDA only.
        control_keys: batch key -> network keyword argument of each ControlNet condition (as the trainer's).
    """

    def __init__(self, device: torch.device | str, val_data_loader: Iterable, network: nn.Module,
                 scheduler: RFlowScheduler, seed: int = 0, epoch_length: int | None = None,
                 key_val_metric: dict | None = None, additional_metrics: dict | None = None,
                 metric_cmp_fn: Callable | None = None, val_handlers: Sequence | None = None,
                 amp: bool = False, control_keys: Mapping[str, str] | None = None) -> None:
        amp = cuda_amp(amp, device)
        kwargs = {"metric_cmp_fn": metric_cmp_fn} if metric_cmp_fn is not None else {}
        super().__init__(device=device, val_data_loader=val_data_loader, epoch_length=epoch_length,
                         key_val_metric=key_val_metric, additional_metrics=additional_metrics,
                         val_handlers=val_handlers, amp=amp, decollate=False, **kwargs)
        self.network, self.scheduler, self.seed = network, scheduler, int(seed)
        self.control_keys = dict(control_keys or {})

    def _iteration(self, engine: RectifiedFlowEvaluator, batchdata: dict) -> dict:
        generator = validation_generator(self.seed, engine.state.iteration, batchdata)
        engine.state.output = self.outputs(engine, batchdata, generator)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def controls(self, batchdata: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """The network's condition arguments of a batch."""
        return {arg: batchdata[key].to(device) for key, arg in self.control_keys.items()}

    def outputs(self, engine: RectifiedFlowEvaluator, batchdata: dict, generator: torch.Generator) -> dict:
        """``{"val_loss"}`` of one batch at noise and timesteps drawn from ``generator`` (the batch's
        :func:`~prod9_components.data.sharding.validation_generator`); subclasses draw on from it and add what their
        handlers read."""
        latent = batchdata["latent"].to(engine.state.device)
        labels = batchdata["label"].to(engine.state.device).long()
        noise = torch.randn(latent.shape, generator=generator).to(latent)
        uniform = torch.rand(latent.shape[0], generator=generator)
        timesteps = (uniform * self.scheduler.num_train_timesteps).to(latent.device)
        with engine.mode(self.network), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16,
                                                                       enabled=self.amp):
            loss = rectified_flow_loss(self.network, self.scheduler, latent, labels, noise, timesteps,
                                       **self.controls(batchdata, latent.device))
        return {"val_loss": loss}
