"""MAISI stage 3: MONAI's ``ControlNetMaisi`` steering a frozen stage-2 ``MaisiDiffusionUNet``.

The ControlNet is a trainable copy of the UNet's encoder half (initialised from the trained UNet) that also reads a
spatial condition through a strided conditioning encoder (image resolution -> latent grid). Its outputs are
residuals added inside the frozen UNet - to each skip connection and to the middle block - not to the UNet's output.
MONAI zero-initialises the residual projections and the conditioning encoder's last layer, so at initialisation the
velocity is the base model's exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.networks.nets.controlnet import ControlNetConditioningEmbedding
from monai.networks.utils import copy_model_state
from torch import nn

from prod9_components.networks.control_types import MAISI_CONTROL_TYPES, control_inputs, parse_control_type
from prod9_components.networks.mask_one_hot import mask_one_hot
from prod9_components.networks.maisi_diffusion import MaisiDiffusionUNet

__all__ = ["CONDITION_TYPES", "MaisiControlNet", "ReusedConditioningEmbedding"]

# The shared vocabulary (prod9_components.networks.control_types): MONAI's ControlNetMaisi always embeds the class
# label, so every value reads it: label, mask+label, image+label, mask+image+label.
CONDITION_TYPES = MAISI_CONTROL_TYPES


class ReusedConditioningEmbedding(ControlNetConditioningEmbedding):
    """MONAI's conditioning encoder (condition (B, C, D, H, W) -> embedding (B, C0, d, h, w)) that, without autograd,
    returns its last output again for an equal condition under unchanged weights.

    Why: a sampler calls the ControlNet once per step with the same condition, and this encoder, at image resolution,
    was most of a sample's time (MAISI demo ControlNet `test`, 64 samples of 10 steps: 45.6 of the ControlNet's 77.5
    s). Equality is checked on the values (``torch.equal``, one pass over the condition), on the weights by their
    in-place version counters (an optimiser step or ``load_state_dict`` bumps them) and on autocast's state, so a
    reused embedding is the one the encoder would compute. With autograd on (training) it always computes. Same
    parameters as MONAI's class.
    """

    _last: tuple | None = None  # (key, condition, embedding)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(conditioning)
        # the weights' versions, and autocast, which sets the embedding's precision
        key = (tuple(p._version for p in self.parameters()), torch.is_autocast_enabled(conditioning.device.type))
        last = self._last
        if not (last and last[0] == key and last[1].shape == conditioning.shape
                and last[1].dtype == conditioning.dtype and last[1].device == conditioning.device
                and torch.equal(last[1], conditioning)):
            self._last = last = (key, conditioning.clone(), super().forward(conditioning))
        return last[2]


class MaisiControlNet(nn.Module):
    """
    A frozen :class:`MaisiDiffusionUNet` plus a trainable ``ControlNetMaisi``.

    Args:
        base_args: ``init_args`` of the stage-2 UNet (load its weights with :meth:`from_base` or a full state dict).
        condition_type: what the ControlNet reads, one of ``CONDITION_TYPES`` (see
            :mod:`~prod9_components.networks.control_types`).
        downsample_factor: image voxels per latent cell along each axis (the VAE's), a power of two.
        conditioning_channels: widths of the conditioning encoder, one stride-2 step between consecutive entries,
            so ``len == log2(downsample_factor) + 1``.
        num_mask_classes: classes of the one-hot mask (BraTS: background, necrosis, oedema, enhancing = 4).

    Shapes:
        x (B, C, d, h, w), timesteps (B,), class_labels (B,): as the base UNet.
        control_mask: (B, D, H, W) or (B, 1, D, H, W) int labels, D = f * d (mask types); control_image: (B, 1, D, H, W) in the VAE's
        intensity range (image types); control_label: (B,) label the ControlNet sees (default ``class_labels``).
        conditioning_scale: multiplies the residuals (MONAI's ``conditioning_scale``): 1 is the trained model, 0 the
            base alone; above 1 amplifies a control that training left weak (a sampling setting, not a weight).
        output: velocity (B, C, d, h, w).
    """

    def __init__(self, base_args: dict, condition_type: str = "mask+label", downsample_factor: int = 4,
                 conditioning_channels: Sequence[int] | None = None, num_mask_classes: int = 4) -> None:
        super().__init__()
        condition_type = parse_control_type(condition_type, "MAISI")
        steps = int(round(math.log2(downsample_factor)))
        if downsample_factor < 1 or 2**steps != downsample_factor:
            raise ValueError(f"downsample_factor must be a power of two, got {downsample_factor}.")
        channels = [16 * 2**i for i in range(steps + 1)] if conditioning_channels is None else list(conditioning_channels)
        if len(channels) != steps + 1:
            raise ValueError(f"conditioning_channels needs {steps + 1} entries for a {downsample_factor}x "
                             f"downsampling, got {channels}.")
        self.base = MaisiDiffusionUNet(**base_args)
        self.init_args = {"base_args": dict(self.base.init_args), "condition_type": condition_type,
                          "downsample_factor": int(downsample_factor),
                          "conditioning_channels": [int(c) for c in channels],
                          "num_mask_classes": int(num_mask_classes)}
        self.condition_type = condition_type
        self.uses_mask = "mask" in control_inputs(condition_type)
        self.uses_image = "image" in control_inputs(condition_type)
        args = self.base.init_args
        self.controlnet = ControlNetMaisi(
            spatial_dims=3, in_channels=args["latent_channels"], num_res_blocks=args["num_res_blocks"],
            num_channels=args["num_channels"], attention_levels=args["attention_levels"],
            norm_num_groups=args["norm_num_groups"], num_head_channels=args["num_head_channels"],
            num_class_embeds=self.base.null_label + 1, conditioning_embedding_in_channels=self.condition_channels,
            conditioning_embedding_num_channels=channels, use_checkpointing=False,
            use_flash_attention=torch.cuda.is_available() if args["use_flash_attention"] is None
            else bool(args["use_flash_attention"]),
        )
        # reused across a sampler's steps; the class alone changes (same parameters, and no random numbers drawn, so a
        # seed trains the same weights as before)
        self.controlnet.controlnet_cond_embedding.__class__ = ReusedConditioningEmbedding
        self._init_conditioning_encoder()
        self.base.requires_grad_(False)

    def _init_conditioning_encoder(self) -> None:
        """He-initialise the conditioning encoder's hidden convolutions; its output layer stays zero.

        Why: MONAI keeps PyTorch's default initialisation there (weight variance 1 / (3 fan_in)), under which each
        convolution + SiLU shrinks the condition ~4x: through the encoder the source image changed the embedding by
        0.009 against its bias's 0.12, and 1000 training steps left the velocity almost blind to it (zeroing the
        image moved it by 4e-5). He initialisation (2 / fan_in) keeps the condition's scale. The zero output layer
        still makes the velocity the base model's at initialisation.
        """
        embedding = self.controlnet.controlnet_cond_embedding
        for block in (embedding.conv_in, *embedding.blocks):
            nn.init.kaiming_normal_(block.conv.weight, nonlinearity="relu")
            nn.init.zeros_(block.conv.bias)

    @property
    def condition_channels(self) -> int:
        """Channels of the spatial condition: the one-hot mask, the source image, or one constant channel."""
        channels = (self.init_args["num_mask_classes"] if self.uses_mask else 0) + (1 if self.uses_image else 0)
        return max(channels, 1)

    @classmethod
    def from_base(cls, base: MaisiDiffusionUNet, **kwargs) -> MaisiControlNet:
        """A ControlNet around a trained UNet: its weights, and the ControlNet's encoder copied from it."""
        net = cls(base.init_args, **kwargs)
        net.base.load_state_dict(base.state_dict())
        copy_model_state(net.controlnet, net.base.state_dict())  # every parameter name the two share
        return net

    # The sampler and the trainer talk to this model as to the base.
    null_label = property(lambda self: self.base.null_label)
    latent_channels = property(lambda self: self.base.latent_channels)

    def train(self, mode: bool = True) -> MaisiControlNet:
        super().train(mode)
        self.base.eval()  # frozen
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def condition(self, x: torch.Tensor, control_mask: torch.Tensor | None,
                  control_image: torch.Tensor | None) -> torch.Tensor:
        """The spatial condition (B, condition_channels, f*d, f*h, f*w) the conditioning encoder reads."""
        f = self.init_args["downsample_factor"]
        size = (x.shape[0], *(s * f for s in x.shape[2:]))
        parts = []
        if self.uses_mask:
            if control_mask is None:
                raise ValueError(f"condition_type {self.condition_type!r} needs control_mask (B, D, H, W).")
            if control_mask.dim() == 5 and control_mask.shape[1] == 1:
                control_mask = control_mask[:, 0]
            parts.append(mask_one_hot(control_mask, self.init_args["num_mask_classes"], size))
        if self.uses_image:
            if control_image is None or tuple(control_image.shape) != (size[0], 1, *size[1:]):
                got = None if control_image is None else tuple(control_image.shape)
                raise ValueError(f"condition_type {self.condition_type!r} needs control_image of shape "
                                 f"{(size[0], 1, *size[1:])}, got {got}.")
            parts.append(control_image.float())
        if not parts:
            parts.append(x.new_zeros((size[0], 1, *size[1:])))
        return torch.cat(parts, dim=1).to(x.dtype)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor,
                control_mask: torch.Tensor | None = None, control_image: torch.Tensor | None = None,
                control_label: torch.Tensor | None = None, conditioning_scale: float = 1.0) -> torch.Tensor:
        condition = self.condition(x, control_mask, control_image)
        down, mid = self.controlnet(x, timesteps, condition, conditioning_scale=float(conditioning_scale),
                                    class_labels=class_labels if control_label is None else control_label)
        return self.base(x, timesteps, class_labels=class_labels, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)
