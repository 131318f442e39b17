"""Ignite trainer of a rectified-flow latent diffusion model (MAISI stage 2) with label dropout and EMA weights."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.networks.schedulers import RFlowScheduler
from torch import nn

from prod9_components.losses.rectified_flow import rectified_flow_loss
from prod9_components.networks.ema import ExponentialMovingAverage
from prod9_components.networks.export import unwrap


class RectifiedFlowTrainer(Trainer):
    """One optimizer step per batch of cached latents: velocity MSE at a timestep the scheduler draws.

    Each batch holds ``"latent"`` (B, C, d, h, w), already scaled to unit std, and ``"label"`` (B,) modality ids.
    With probability ``label_dropout`` a sample's label becomes the network's null label, which trains the
    unconditional model classifier-free guidance needs. After each step the EMA copy (if any) follows.

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
    """

    def __init__(self, device: torch.device | str, max_epochs: int, train_data_loader: Iterable, network: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: RFlowScheduler,
                 ema: ExponentialMovingAverage | None = None, label_dropout: float = 0.1,
                 epoch_length: int | None = None, non_blocking: bool = False,
                 train_handlers: Sequence | None = None, amp: bool = False, grad_clip: float | None = 1.0) -> None:
        amp = bool(amp) and torch.device(device).type == "cuda"
        super().__init__(device=device, max_epochs=max_epochs, data_loader=train_data_loader,
                         epoch_length=epoch_length, non_blocking=non_blocking, handlers=train_handlers, amp=amp,
                         decollate=False)
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        self.network, self.optimizer, self.scheduler, self.ema = network, optimizer, scheduler, ema
        self.label_dropout, self.grad_clip = float(label_dropout), grad_clip

    def _iteration(self, engine: RectifiedFlowTrainer, batchdata: dict) -> dict:
        latent = batchdata["latent"].to(engine.state.device, non_blocking=engine.non_blocking)
        labels = batchdata["label"].to(engine.state.device).long()
        dropped = torch.rand(labels.shape, device=labels.device) < self.label_dropout
        labels = torch.where(dropped, torch.full_like(labels, unwrap(self.network).null_label), labels)

        self.network.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            loss = rectified_flow_loss(self.network, self.scheduler, latent, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.network)

        engine.state.output = {"loss": loss.detach()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
