"""ControlNet for the MaskGiT transformer (stage 3): steer a frozen stage-2 model with a tumour mask and/or a label.

A trainable copy of the first ``num_control_blocks`` blocks of the base transformer runs beside them. Its input is
the base model's embedded sequence plus the control embedding on the target positions; after each of those base
blocks, a zero-initialised linear projection of the copy's hidden state is added to the base hidden state (a
residual injection, not a change of the output). At initialisation the projections are zero, so the output is the
base model's exactly; training moves only the branch, the mask encoder, the label embedding and the projections.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from prod9_components.networks.control_types import MASKGIT_CONTROL_TYPES, control_inputs, parse_control_type
from prod9_components.networks.mask_one_hot import mask_one_hot
from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream

__all__ = ["CONTROL_TYPES", "MaskEncoder", "MaskGiTControlNet"]

CONTROL_TYPES = MASKGIT_CONTROL_TYPES  # the shared vocabulary: prod9_components.networks.control_types


class MaskEncoder(nn.Module):
    """One-hot tumour mask at image resolution -> one vector per token: (B, C, D, H, W) -> (B, hidden, d, h, w).

    Strided convolutions halve the grid ``log2(downsample_factor)`` times (the stage-1 downsampling), so every
    token sees the mask inside its own block and around it.
    """

    def __init__(self, num_classes: int, hidden_dim: int, downsample_factor: int, channels: int = 32) -> None:
        super().__init__()
        steps = int(round(math.log2(downsample_factor)))
        if downsample_factor < 1 or 2**steps != downsample_factor:
            raise ValueError(f"downsample_factor must be a power of two, got {downsample_factor}.")
        layers: list[nn.Module] = [nn.Conv3d(num_classes, channels, 3, padding=1), nn.SiLU()]
        for _ in range(steps):
            layers += [nn.Conv3d(channels, channels, 3, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.Conv3d(channels, hidden_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, mask_one_hot: torch.Tensor) -> torch.Tensor:
        return self.net(mask_one_hot)


class MaskGiTControlNet(nn.Module):
    """
    A frozen :class:`TransformerDecoderSingleStream` plus a trainable control branch.

    Args:
        base_args: ``init_args`` of the stage-2 transformer (the base is built from them; load its weights with
            :meth:`from_base` or a full state dict).
        control_type: what the branch reads (see :mod:`~prod9_components.networks.control_types`): ``"mask"`` (the
            tumour mask), ``"label"`` (a modality embedding) or ``"mask+label"`` (their sum).
        num_control_blocks: how many leading base blocks get a trainable copy (default: half, at least 1).
        num_mask_classes: classes of the one-hot mask (BraTS: background, necrosis, oedema, enhancing = 4).
        downsample_factor: image voxels per token along each axis (the stage-1 autoencoder's).
        encoder_channels: width of the mask encoder.

    Shapes (besides the base model's, see :class:`TransformerDecoderSingleStream`):
        control_mask: (B, D, H, W) int labels in [0, num_mask_classes) at image resolution, D = d * f; needed for
            mask control, unless ``mask_embedding`` is given.
        mask_embedding: (B, d*h*w, hidden) :meth:`encode_mask` of the control mask, for many calls with one mask (a
            sampler's steps): its full-resolution convolutions are a sixth of a sampling call.
        control_label: (B,) modality label for label control (default: ``target_label``).
        positions: (B, d, h, w) bool or None: score only these target positions (training).
        targets: (M,) int64 or None: with ``positions``, their true tokens; the output is then the loss dict.
        target_weights: (M,) float or None: with ``targets``, each position's weight in the mean loss.
        code_weight: with ``targets``, the weight of the expected code's squared error in the loss.
        conditioning_scale: multiplies the branch's projections added to the base: 1 is the trained model, 0 the base
            alone; above 1 amplifies a control that training left weak (a sampling setting, not a weight).
        output: logits (B, K, d, h, w); with ``positions``, (M, K) of its True positions (row-major order).
    """

    def __init__(self, base_args: dict, control_type: str = "mask", num_control_blocks: int | None = None,
                 num_mask_classes: int = 4, downsample_factor: int = 4, encoder_channels: int = 32) -> None:
        super().__init__()
        control_type = parse_control_type(control_type, "MaskGiT")
        if not isinstance(encoder_channels, int) or isinstance(encoder_channels, bool) or encoder_channels < 1:
            # a flag or a shared checkpoint's record: 0 built an encoder of empty convolutions
            raise ValueError(f"encoder_channels must be a whole number >= 1, got {encoder_channels!r}")
        self.base = TransformerDecoderSingleStream(**base_args)
        depth = len(self.base.blocks)
        num_control_blocks = max(1, depth // 2) if num_control_blocks is None else int(num_control_blocks)
        if not 1 <= num_control_blocks <= depth:
            raise ValueError(f"num_control_blocks must be in [1, {depth}] (the base has {depth} blocks), "
                             f"got {num_control_blocks}.")
        self.init_args = {"base_args": dict(self.base.init_args), "control_type": control_type,
                          "num_control_blocks": num_control_blocks, "num_mask_classes": int(num_mask_classes),
                          "downsample_factor": int(downsample_factor), "encoder_channels": encoder_channels}
        self.control_type = control_type
        self.num_mask_classes = int(num_mask_classes)
        hidden = self.base.init_args["hidden_dim"]
        self.control_blocks = nn.ModuleList(copy.deepcopy(self.base.blocks[i]) for i in range(num_control_blocks))
        self.mask_encoder = (MaskEncoder(num_mask_classes, hidden, downsample_factor, encoder_channels)
                             if "mask" in control_inputs(control_type) else None)
        self.label_embedding = (nn.Embedding(self.base.context.num_modalities + 1, hidden)
                                if "label" in control_inputs(control_type) else None)
        self.zero_projections = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_control_blocks))
        for projection in self.zero_projections:
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)
        self.base.requires_grad_(False)

    @classmethod
    def from_base(cls, base: TransformerDecoderSingleStream, **kwargs) -> MaskGiTControlNet:
        """A control net around a trained transformer: its weights, and the branch copied from its first blocks."""
        net = cls(base.init_args, **kwargs)
        net.base.load_state_dict(base.state_dict())
        for copy_block, block in zip(net.control_blocks, net.base.blocks):
            copy_block.load_state_dict(block.state_dict())
        if net.label_embedding is not None:
            net.label_embedding.weight.data.copy_(net.base.context.modality_embedding.weight)
        return net

    # The sampler and the trainer talk to this model as to the base.
    mask_token_id = property(lambda self: self.base.mask_token_id)
    null_label = property(lambda self: self.base.null_label)
    codebook_size = property(lambda self: self.base.codebook_size)

    def train(self, mode: bool = True) -> MaskGiTControlNet:
        super().train(mode)
        self.base.eval()  # frozen: no dropout, so the base's function is fixed
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def encode_mask(self, control_mask: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, D, H, W) int mask on the token ``grid`` (d, h, w) times the downsampling -> (B, d*h*w, hidden)."""
        if self.mask_encoder is None:
            raise ValueError(f"control_type {self.control_type!r} takes no mask.")
        if control_mask is None:
            raise ValueError(f"control_type {self.control_type!r} needs control_mask (B, D, H, W).")
        factor = self.init_args["downsample_factor"]  # the mask is the token grid x factor
        size = (control_mask.shape[0], *(int(s) * factor for s in grid))
        return self.mask_encoder(mask_one_hot(control_mask, self.num_mask_classes, size)).flatten(2).transpose(1, 2)

    def control_embedding(self, grid: tuple[int, int, int], batch: int, control_mask: torch.Tensor | None,
                          control_label: torch.Tensor, mask_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d*h*w, hidden) added to the target positions of the branch's input."""
        control = 0
        if self.mask_encoder is not None:
            control = self.encode_mask(control_mask, grid) if mask_embedding is None else mask_embedding
            expected = (batch, math.prod(grid), self.base.init_args["hidden_dim"])
            if tuple(control.shape) != expected:
                raise ValueError(f"mask_embedding must have shape {expected}, got {tuple(control.shape)}.")
        if self.label_embedding is not None:
            control = control + self.label_embedding(control_label)[:, None]
        return control

    def forward(self, target_tokens: torch.Tensor, target_label: torch.Tensor,
                source_tokens: torch.Tensor | None = None, source_labels: torch.Tensor | None = None,
                grid_origin: torch.Tensor | None = None, control_mask: torch.Tensor | None = None,
                control_label: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                targets: torch.Tensor | None = None,
                target_weights: torch.Tensor | None = None, code_weight: float = 0.0,
                conditioning_scale: float = 1.0,
                mask_embedding: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        batch, d, h, w = target_tokens.shape
        x, attn_mask, context_length = self.base.embed_sequence(target_tokens, target_label, source_tokens,
                                                               source_labels, grid_origin)
        control = self.control_embedding((d, h, w), batch, control_mask,
                                         target_label if control_label is None else control_label, mask_embedding)
        c = torch.cat([x[:, :context_length], x[:, context_length:] + control], dim=1)
        for i, block in enumerate(self.base.blocks):
            x = block(x, attn_mask)
            if i < len(self.control_blocks):
                c = self.control_blocks[i](c, attn_mask)
                x = x + float(conditioning_scale) * self.zero_projections[i](c)
        return self.base.logits(x, context_length, (d, h, w), positions, targets, target_weights, code_weight)
