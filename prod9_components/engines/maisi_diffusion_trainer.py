"""Ignite trainer of a rectified-flow latent diffusion model (MAISI stages 2 and 3) with label dropout, EMA weights
and, for a ControlNet, its spatial conditions and the optional region-specific contrastive loss."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from monai.engines.utils import IterationEvents
from monai.networks.schedulers import RFlowScheduler
from torch import nn

from prod9_components.data.settings import number_setting
from prod9_components.engines.base_trainer import BaseTrainer
from prod9_components.losses.rectified_flow import noisy_latent, velocity_loss
from prod9_components.losses.region_contrastive import region_contrastive_loss, tumour_region, tumour_weights
from prod9_components.networks.ema import ExponentialMovingAverage
from prod9_components.networks.export import unwrap


class RectifiedFlowTrainer(BaseTrainer):
    """One optimizer step per batch of cached latents: velocity MSE at a timestep the scheduler draws.

    Each batch holds ``"latent"`` (B, C, d, h, w), already scaled to unit std, and ``"label"`` (B,) modality ids.
    With probability ``label_dropout`` a sample's label becomes the network's null label, which trains the
    unconditional model classifier-free guidance needs. After each step the EMA copy (if any) follows.

    A ControlNet (:class:`~prod9_components.networks.maisi_controlnet.MaisiControlNet`) gets its conditions from
    the batch through ``control_keys`` (e.g. ``{"seg": "control_mask", "source": "control_image"}``); only its
    trainable parameters should be in ``optimizer``. With ``tumour_weight > 1`` the squared velocity error of the
    latent cells that hold tumour counts that many times (MAISI's ControlNet recipe weights its tumour labels so: a
    tumour is a few percent of the volume). With ``contrastive_weight > 0`` the same noisy latents also go
    through the network with the tumour removed from the mask (one batched forward) and
    :func:`~prod9_components.losses.region_contrastive.region_contrastive_loss` is added.

    Args:
        device: where the networks live.
        max_epochs: number of epochs.
        train_data_loader: yields ``{"latent", "label"}``.
        network: the velocity model (``null_label`` attribute; DDP wrappers are looked through).
        optimizer: its optimizer.
        scheduler: MONAI ``RFlowScheduler`` (timestep sampling and noising).
        ema: an :class:`ExponentialMovingAverage` of ``network`` updated after every step, or None.
        label_dropout: probability of replacing a label with the null label.
        epoch_length: iterations per epoch (``limit_train_batches``); None means the whole loader.
        train_handlers: Ignite/MONAI handlers.
        amp: bfloat16 autocast (CUDA only: on CPU bfloat16 matmul is hundreds of times slower).
        grad_clip: max gradient norm, None to disable.
        control_keys: batch key -> network keyword argument of each spatial condition.
        tumour_weight: weight of the tumour's latent cells in the velocity loss (a weighted mean; needs
            ``control_mask``); 1 for the plain mean.
        contrastive_weight / contrastive_margin: the region-specific contrastive loss (needs ``control_mask``).
    """

    def __init__(self, device: torch.device | str, max_epochs: int, train_data_loader: Iterable, network: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: RFlowScheduler,
                 ema: ExponentialMovingAverage | None = None, label_dropout: float = 0.1,
                 epoch_length: int | None = None, non_blocking: bool = False,
                 train_handlers: Sequence | None = None, amp: bool = False, grad_clip: float | None = 1.0,
                 control_keys: Mapping[str, str] | None = None, contrastive_weight: float = 0.0,
                 contrastive_margin: float = 0.05, tumour_weight: float = 1.0) -> None:
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, epoch_length, non_blocking,
                         train_handlers, amp, torch.bfloat16, grad_clip)
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        self.scheduler, self.ema, self.label_dropout = scheduler, ema, float(label_dropout)
        self.control_keys = dict(control_keys or {})
        self.contrastive_weight, self.contrastive_margin = float(contrastive_weight), float(contrastive_margin)
        if self.contrastive_weight and "control_mask" not in self.control_keys.values():
            raise ValueError("the region-specific contrastive loss needs a mask condition (control_keys naming "
                             "control_mask)")
        self.tumour_weight = number_setting("tumour_weight", tumour_weight, 1.0)
        if self.tumour_weight != 1.0 and "control_mask" not in self.control_keys.values():
            raise ValueError("tumour_weight needs a mask condition (control_keys naming control_mask)")

    def _iteration(self, engine: RectifiedFlowTrainer, batchdata: dict) -> dict:
        latent = batchdata["latent"].to(engine.state.device, non_blocking=engine.non_blocking)
        labels = batchdata["label"].to(engine.state.device).long()
        dropped = torch.rand(labels.shape, device=labels.device) < self.label_dropout
        labels = torch.where(dropped, torch.full_like(labels, unwrap(self.network).null_label), labels)

        controls = {arg: batchdata[key].to(engine.state.device) for key, arg in self.control_keys.items()}

        self.network.train()
        with self.autocast():
            noisy, timesteps, target = noisy_latent(self.scheduler, latent)
            if self.contrastive_weight:  # the same inputs with the tumour removed, in one forward (DDP-safe)
                mask = controls["control_mask"]
                doubled = {k: torch.cat([v, torch.zeros_like(v) if k == "control_mask" else v])
                           for k, v in controls.items()}
                velocity, without = self.network(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                                                 class_labels=torch.cat([labels, labels]), **doubled).chunk(2)
                contrastive = region_contrastive_loss(velocity, without, tumour_region(mask, tuple(latent.shape[2:])),
                                                      self.contrastive_margin)
            else:
                velocity = self.network(noisy, timesteps, class_labels=labels, **controls)
            weight = None if self.tumour_weight == 1.0 else tumour_weights(controls["control_mask"],
                                                                           tuple(latent.shape[2:]), self.tumour_weight)
            flow_loss = velocity_loss(velocity, target, weight)
            loss = flow_loss + self.contrastive_weight * contrastive if self.contrastive_weight else flow_loss
        self.optimizer_step(loss)
        if self.ema is not None:
            self.ema.update(self.network)

        engine.state.output = {"loss": loss.detach(), "velocity_loss": flow_loss.detach()}
        if self.contrastive_weight:
            engine.state.output["contrastive_loss"] = contrastive.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
