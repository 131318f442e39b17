"""Generator and discriminator objectives of a stage-1 autoencoder (FSQ autoencoder or KL-VAE) trained as a GAN.

generator loss = recon_weight * L1 + mse_weight * L2 + perceptual_weight * perceptual
                 + adversarial_weight * adaptive_weight * adversarial + kl_weight * KL

The adaptive weight balances the adversarial gradient against the reconstruction gradient at the decoder's last
layer (Esser et al., "Taming Transformers", 2021). Before ``disc_start`` the adversarial term is off (warm-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.losses import PatchAdversarialLoss
from torch import nn

from prod9_components.losses.focal_frequency import FocalFrequencyLoss

PERCEPTUAL_CHOICES = ("focal_frequency", "monai", "none")


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(z_mu, z_sigma^2) || N(0, 1)), summed over latent dims and averaged over the batch (as in MAISI).

    Args:
        z_mu: latent means, (B, ...).
        z_sigma: latent standard deviations (positive), same shape as ``z_mu``.

    Returns:
        scalar.
    """
    variance = z_sigma.float().square()
    per_element = 0.5 * (z_mu.float().square() + variance - torch.log(variance.clamp_min(1e-10)) - 1.0)
    return per_element.flatten(1).sum(dim=1).mean()


def _last_logits(logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    # MONAI's PatchDiscriminator returns every intermediate feature map; the logits are the last one.
    if isinstance(logits, torch.Tensor):
        return logits
    return logits[-1]


def _build_perceptual(perceptual: str, perceptual_kwargs: dict[str, Any] | None) -> nn.Module | None:
    kwargs = dict(perceptual_kwargs or {})
    if perceptual == "focal_frequency":
        return FocalFrequencyLoss(**kwargs)
    if perceptual == "none":
        return None
    if perceptual == "monai":
        from monai.losses import PerceptualLoss

        kwargs.setdefault("spatial_dims", 3)
        try:
            return PerceptualLoss(**kwargs)
        except Exception as error:  # any failure here is missing weights/packages; say how to fix it in one line
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RuntimeError(
                f"MONAI PerceptualLoss could not be built ({type(error).__name__}: {first_line}); it needs a local "
                "weights file since nothing can be downloaded: pass perceptual_kwargs={'network_type': 'resnet50', "
                "'pretrained_path': '/path/weights.pth'} (needs torchvision) or {'network_type': "
                "'medicalnet_resnet10_23datasets', 'is_fake_3d': False, 'cache_dir': '/path/to/torch_hub_cache'}, "
                "or use perceptual='focal_frequency'."
            ) from error
    raise ValueError(f"perceptual must be one of {PERCEPTUAL_CHOICES}, got {perceptual!r}.")


class AutoencoderGANLoss(nn.Module):
    """Losses of an autoencoder trained against a patch discriminator.

    Args:
        recon_weight: weight of the L1 reconstruction loss.
        mse_weight: weight of the squared-error reconstruction loss (the one PSNR measures; L1 alone favours the
            median and leaves larger errors at edges).
        perceptual_weight: weight of the perceptual loss.
        adversarial_weight: weight of the adversarial generator loss (multiplied by the adaptive weight).
        kl_weight: weight of the KL term (KL-VAE only; 0 disables it).
        disc_start: iteration from which the adversarial term counts; before it the adversarial weight is 0.
        adaptive_weight: balance the adversarial gradient against the reconstruction gradient at ``last_layer``
            (VQGAN); if False the adaptive weight is 1 once the discriminator starts.
        max_adaptive_weight: upper clamp of the adaptive weight.
        perceptual: ``"focal_frequency"`` (default, needs no weights), ``"monai"`` (MONAI ``PerceptualLoss`` with
            ``perceptual_kwargs``; needs a local weights file) or ``"none"``.
        perceptual_kwargs: constructor arguments of the perceptual loss.

    Notes:
        The least-squares criterion is MONAI's ``PatchAdversarialLoss(criterion="least_squares")`` with its default
        LeakyReLU(0.05) applied to the logits before the squared error (as in MONAI's generative tutorials and
        MAISI).
    """

    def __init__(
        self,
        recon_weight: float = 1.0,
        mse_weight: float = 0.0,
        perceptual_weight: float = 0.1,
        adversarial_weight: float = 0.1,
        kl_weight: float = 0.0,
        disc_start: int = 1000,
        adaptive_weight: bool = True,
        max_adaptive_weight: float = 1e4,
        perceptual: str = "focal_frequency",
        perceptual_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        weights = {"recon_weight": recon_weight, "mse_weight": mse_weight, "perceptual_weight": perceptual_weight,
                   "adversarial_weight": adversarial_weight, "kl_weight": kl_weight}
        negative = [f"{name}={value!r}" for name, value in weights.items() if not value >= 0]
        if negative:  # a negative (or NaN) weight would train the network away from the images
            raise ValueError(f"AutoencoderGANLoss: {negative[0]}; loss weights must be >= 0")
        self.recon_weight = recon_weight
        self.mse_weight = mse_weight
        self.perceptual_weight = perceptual_weight
        self.adversarial_weight = adversarial_weight
        self.kl_weight = kl_weight
        self.disc_start = disc_start
        self.adaptive_weight = adaptive_weight
        self.max_adaptive_weight = max_adaptive_weight
        self.perceptual_loss = _build_perceptual(perceptual, perceptual_kwargs) if perceptual_weight > 0 else None
        self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")

    def compute_adaptive_weight(
        self, nll_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """||d nll / d last_layer|| / (||d adv / d last_layer|| + 1e-4), clamped to [0, max], detached.

        Args:
            nll_loss: weighted reconstruction + perceptual loss (scalar, in the graph of ``last_layer``).
            adv_loss: adversarial generator loss (scalar, in the graph of ``last_layer``).
            last_layer: weight of the decoder's last layer.
        """
        # retain_graph: the trainer still back-propagates the total loss through the same graph.
        nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
        weight = nll_grad.norm() / (adv_grad.norm() + 1e-4)
        return weight.clamp(0.0, self.max_adaptive_weight).detach()

    def generator_loss(
        self,
        image: torch.Tensor,
        reconstruction: torch.Tensor,
        fake_logits: torch.Tensor | Sequence[torch.Tensor] | None,
        last_layer: torch.Tensor | None,
        iteration: int,
        z_mu: torch.Tensor | None = None,
        z_sigma: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            image: real volume, (B, C, D, H, W).
            reconstruction: autoencoder output, same shape.
            fake_logits: discriminator output on ``reconstruction`` (a tensor, or the list a MONAI
                ``PatchDiscriminator`` returns, whose last item is used); None skips the adversarial term.
            last_layer: weight of the decoder's last layer, for the adaptive weight (None: weight 1).
            iteration: global training iteration, compared with ``disc_start``.
            z_mu, z_sigma: posterior mean and std of a KL-VAE, (B, latent_channels, d, h, w).

        Returns:
            dict with ``loss`` (total, differentiable), ``recon_loss`` (L1), ``mse_loss`` (0 when unweighted),
            ``perceptual_loss``, ``adv_loss``,
            ``adaptive_weight`` (the factor applied to ``adversarial_weight * adv_loss``: 0 during warm-up, 1 when it
            cannot be computed, e.g. under ``torch.no_grad()``) and ``kl_loss``; all scalars.
        """
        zero = reconstruction.new_zeros(())
        error = reconstruction.float() - image.float()
        recon_loss = error.abs().mean()
        mse_loss = error.square().mean() if self.mse_weight > 0 else zero
        perceptual_loss = self.perceptual_loss(reconstruction, image) if self.perceptual_loss is not None else zero
        nll_loss = self.recon_weight * recon_loss + self.mse_weight * mse_loss + self.perceptual_weight * perceptual_loss

        adv_loss = zero
        adaptive = zero
        if fake_logits is not None:
            adv_loss = self.adversarial_loss(_last_logits(fake_logits), target_is_real=True, for_discriminator=False)
            if iteration >= self.disc_start:
                adaptive = torch.ones_like(zero)
                can_differentiate = (
                    self.adaptive_weight
                    and last_layer is not None
                    and torch.is_grad_enabled()
                    and nll_loss.requires_grad
                    and adv_loss.requires_grad
                )
                if can_differentiate:
                    adaptive = self.compute_adaptive_weight(nll_loss, adv_loss, last_layer)  # type: ignore[arg-type]

        kl_loss = zero
        if self.kl_weight > 0 and z_mu is not None and z_sigma is not None:
            kl_loss = kl_divergence(z_mu, z_sigma)

        loss = nll_loss + self.adversarial_weight * adaptive * adv_loss + self.kl_weight * kl_loss
        return {
            "loss": loss,
            "recon_loss": recon_loss,
            "mse_loss": mse_loss,
            "perceptual_loss": perceptual_loss,
            "adv_loss": adv_loss,
            "adaptive_weight": adaptive,
            "kl_loss": kl_loss,
        }

    def discriminator_loss(
        self, real_logits: torch.Tensor | Sequence[torch.Tensor], fake_logits: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Least-squares discriminator loss: mean of (real -> 1) and (fake -> 0).

        The trainer decides when to step the discriminator (from ``disc_start``); this always returns the real loss.

        Args:
            real_logits: discriminator output on real volumes (tensor or ``PatchDiscriminator`` list).
            fake_logits: discriminator output on detached reconstructions.

        Returns:
            scalar.
        """
        real = self.adversarial_loss(_last_logits(real_logits), target_is_real=True, for_discriminator=True)
        fake = self.adversarial_loss(_last_logits(fake_logits), target_is_real=False, for_discriminator=True)
        return 0.5 * (real + fake)
