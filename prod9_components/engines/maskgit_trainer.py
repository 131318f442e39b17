"""Ignite trainer for the MaskGiT transformer: masked-token cross-entropy on cached token grids."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from monai.engines.utils import IterationEvents
from torch import nn

from prod9_components.data.settings import number_setting
from prod9_components.engines.base_trainer import BaseTrainer
from prod9_components.engines.maskgit_context import TokenContextBuilder, control_inputs
from prod9_components.losses.region_contrastive import tumour_weights
from prod9_components.networks.export import unwrap
from prod9_components.sampling.schedules import sample_training_mask


class MaskGiTTrainer(BaseTrainer):
    """One optimizer step per batch of token crops.

    Per sample: draw the target modality (and, in-context, a subset of source modalities), draw a mask ratio from
    the schedule, replace that many random target tokens by [MASK], and score the logits at the masked positions
    only (loss on the visible tokens would teach the model to copy: DESIGN §4 trap 3). The network is asked for the
    loss of those positions only (``positions=mask, targets=...``): its head and the cross-entropy run fused, in
    chunks, so neither the (B, K, d, h, w) grid nor the (M, K) logits are ever held.

    Args:
        device: where the network lives.
        max_epochs: number of epochs.
        train_data_loader: yields dicts with ``"tokens"`` (B, 4, d, h, w) int64 and ``"grid_origin"`` (B, 3) (crops
            from ``RandTokenCropd``; absent for whole grids).
        network: ``TransformerDecoderSingleStream`` or ``MaskGiTControlNet`` (or a DDP wrapper of one).
        optimizer: its optimizer.
        context_builder: turns token grids into targets and context.
        schedule: masking schedule of the training mask ratio ("cosine", "linear", "sqrt", "log").
        epoch_length: iterations per epoch (``limit_train_batches``), None for the whole loader.
        train_handlers: Ignite/MONAI handlers.
        amp: bfloat16 autocast on CUDA (ignored on CPU).
        grad_clip: max gradient norm, None to disable.
        control_mask_key: batch key of the tumour mask (B, 1, D, H, W) a ControlNet is steered by (``"seg"``);
            None for the stage-2 transformer.
        tumour_weight: weight of the masked tokens that cover tumour in the mean cross-entropy (needs
            ``control_mask_key``; the tumour is a few percent of the tokens); 1 for the plain mean.
        code_weight: weight of the expected FSQ code's squared error beside the cross-entropy (``softmax(logits) @
            codes`` against the true code, mean over the masked positions and code channels; needs a network built
            with ``code_levels``): the cross-entropy scores a neighbouring code on the FSQ grid as wrong as any
            other, while an expected-code translation (``expected_codes``) decodes the very code it scores. 0: off.
    """

    def __init__(self, device: torch.device | str, max_epochs: int, train_data_loader: Iterable, network: nn.Module,
                 optimizer: torch.optim.Optimizer, context_builder: TokenContextBuilder, schedule: str = "cosine",
                 epoch_length: int | None = None, train_handlers: Sequence | None = None, amp: bool = False,
                 grad_clip: float | None = 1.0, non_blocking: bool = False,
                 control_mask_key: str | None = None, tumour_weight: float = 1.0, code_weight: float = 0.0) -> None:
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, epoch_length, non_blocking,
                         train_handlers, amp, torch.bfloat16, grad_clip)
        self.context_builder = context_builder
        self.schedule = schedule
        self.control_mask_key = control_mask_key
        self.tumour_weight = number_setting("tumour_weight", tumour_weight, 1.0)
        if self.tumour_weight != 1.0 and control_mask_key is None:
            raise ValueError("tumour_weight needs a mask condition (control_mask_key)")
        self.code_weight = number_setting("code_weight", code_weight, 0.0)

    def _iteration(self, engine: MaskGiTTrainer, batchdata: dict) -> dict:
        tokens = batchdata["tokens"].to(engine.state.device, non_blocking=engine.non_blocking)
        origin = batchdata.get("grid_origin")  # where each crop lies in its case's token grid
        origin = None if origin is None else origin.to(engine.state.device)
        inputs = self.context_builder(tokens, train=True)
        target = inputs["target_tokens"]
        mask = sample_training_mask(target.shape, self.schedule).to(target.device)
        masked_input = target.masked_fill(mask, unwrap(self.network).mask_token_id)
        controls = control_inputs(batchdata, inputs["rows"], self.control_mask_key)
        weights = None if self.tumour_weight == 1.0 else tumour_weights(
            controls["control_mask"], tuple(target.shape[1:]), self.tumour_weight)[:, 0][mask]

        self.network.train()
        with self.autocast():
            # The loss of the M masked positions only: the head and the cross-entropy never touch the visible ones.
            # Through forward (not another method), so a DDP wrapper syncs the gradients.
            losses = self.network(masked_input, inputs["target_label"], inputs["source_tokens"],
                                  inputs["source_labels"], origin, positions=mask, targets=target[mask],
                                  target_weights=weights, code_weight=self.code_weight, **controls)
        self.optimizer_step(losses["loss"])

        engine.state.output = {"loss": losses["loss"].detach(), "token_accuracy": losses["token_accuracy"].detach(),
                               "mask_ratio": mask.float().mean().detach()}
        if "code_error" in losses:
            engine.state.output["code_error"] = losses["code_error"].detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
