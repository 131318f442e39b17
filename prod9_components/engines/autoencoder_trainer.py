"""Ignite trainer for GAN-trained autoencoders (FSQ autoencoder and MAISI KL-VAE).

MONAI's ``AdversarialTrainer`` reports no ``loss`` without AMP and has no adaptive weight or discriminator warm-up,
so this is the small custom trainer the MAISI and model-zoo generative bundles also use: per iteration one
generator step and, once the warm-up is over, one discriminator step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from monai.engines.utils import IterationEvents
from torch import nn

from prod9_components.engines.base_trainer import BaseTrainer, channels_last_on_cpu
from prod9_components.networks.export import unwrap


class AutoencoderGANTrainer(BaseTrainer):
    """Train an autoencoder with an :class:`~prod9_components.losses.autoencoder_gan.AutoencoderGANLoss`.

    The network maps ``image (B, C, D, H, W)`` to ``(reconstruction, codes)`` (FSQ) or
    ``(reconstruction, z_mu, z_sigma)`` (KL-VAE); it must expose ``get_last_layer()`` for the adaptive
    adversarial weight (DDP wrappers are looked through).

    Args:
        device: where the networks live.
        max_epochs: number of epochs.
        train_data_loader: yields dicts with ``"image"``.
        network: the autoencoder (generator).
        optimizer: its optimizer.
        discriminator: a MONAI ``PatchDiscriminator`` (returns every feature map, logits last).
        disc_optimizer: the discriminator's optimizer.
        loss_function: ``AutoencoderGANLoss``; its ``disc_start`` also delays the discriminator steps.
        epoch_length: iterations per epoch (``limit_train_batches``); None means the whole loader.
        train_handlers: Ignite/MONAI handlers to attach.
        amp: float16 autocast + GradScaler, one per network (CUDA only: on CPU float32).
        grad_clip: max gradient norm for both networks, None to disable.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        discriminator: nn.Module,
        disc_optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        grad_clip: float | None = 1.0,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, epoch_length, non_blocking,
                         train_handlers, amp, torch.float16, grad_clip)
        self.discriminator = channels_last_on_cpu(discriminator, device)
        self.disc_optimizer = disc_optimizer
        self.loss_function = loss_function
        # The discriminator's own loss scale (the generator's is the base class's ``scaler``); made here so a resumed
        # run restores it from last.ckpt.
        self.disc_scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def _iteration(self, engine: AutoencoderGANTrainer, batchdata: dict) -> dict:
        # A plain tensor: a MetaTensor would carry its metadata through every op of the step, and MONAI's upsample
        # copies it back to a plain tensor (a full-resolution copy per step, 16% of the demo VAE's step).
        images = batchdata["image"].as_subclass(torch.Tensor).to(engine.state.device, non_blocking=engine.non_blocking)
        iteration = engine.state.iteration
        self.network.train()
        self.discriminator.train()

        # Generator step. The discriminator is not updated here, so its gradients are discarded; during the
        # warm-up its output would be multiplied by 0, so it is not computed at all (a third of a tiny step).
        adversarial = iteration >= self.loss_function.disc_start
        with self.autocast():
            reconstruction, *latent = self.network(images)
            z_mu, z_sigma = (latent[0], latent[1]) if len(latent) == 2 else (None, None)
            fake_logits = self.discriminator(reconstruction.float().contiguous()) if adversarial else None
            losses = self.loss_function.generator_loss(
                images, reconstruction.float(), fake_logits, unwrap(self.network).get_last_layer(), iteration,
                z_mu=z_mu, z_sigma=z_sigma)
        self.optimizer_step(losses["loss"])

        # Discriminator step, from the end of the warm-up on.
        disc_loss = torch.zeros((), device=images.device)
        if adversarial:
            with self.autocast():
                # One forward over real and fake together: DDP expects one forward per backward.
                both = torch.cat([images, reconstruction.detach().to(images.dtype)]).contiguous()
                logits = self.discriminator(both)[-1]
                real_logits, fake_logits = logits.split(images.shape[0])
                disc_loss = self.loss_function.discriminator_loss(real_logits, fake_logits)
            self.optimizer_step(disc_loss, self.disc_optimizer, self.discriminator.parameters(), self.disc_scaler)

        output = {name: value.detach().float() for name, value in losses.items() if torch.is_tensor(value)}
        output.update({"image": images, "pred": reconstruction.detach(), "disc_loss": disc_loss.detach()})
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
