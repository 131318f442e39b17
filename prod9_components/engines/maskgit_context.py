"""Prepare-batch for the MaskGiT transformer: cached token grids of all modalities -> what the model sees.

One class serves both stage-2 bundles: label-conditional generation is in-context generation whose context is only
the target label (no source modalities).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prod9_components.data.modalities import MODALITIES, modality_index, modality_name


class TokenContextBuilder:
    """Split token grids ``(B, M, d, h, w)`` (M = 4 modalities, T1, T1ce, T2, FLAIR) into transformer inputs.

    Args:
        target_modalities: modalities the model learns to generate (names or indices); a training sample draws one.
        source_modalities: modalities given as context (in-context translation); empty for label-conditional.
        random_source_subsets: during training give each sample a random non-empty subset of the sources, so one
            model translates from 1..S sources; evaluation always uses all of them.
        context_dropout: probability of replacing a training sample's whole context by the null context (no
            sources, null label) — what classifier-free guidance needs.
        null_label: the transformer's null-label index.

    Returns (``__call__``): dict with ``target_tokens`` (B', d, h, w), ``target_label`` (B',), ``source_tokens``
    (B', S, d, h, w) or None, ``source_labels`` (B', S) with -1 padding or None, and ``rows`` (B',): the batch
    item each output row came from. In evaluation every sample is expanded to every target modality
    (B' = B x len(target_modalities)); in training B' = B.
    """

    def __init__(self, target_modalities: Sequence[int | str] = MODALITIES, source_modalities: Sequence[int | str] = (),
                 random_source_subsets: bool = True, context_dropout: float = 0.0, null_label: int = len(MODALITIES)):
        self.targets = [modality_index(m) for m in target_modalities]
        self.sources = [modality_index(m) for m in source_modalities]
        if not self.targets:
            raise ValueError("target_modalities is empty: name at least one of " + ", ".join(
                modality_name(i) for i in range(len(MODALITIES))))
        both = sorted(set(self.targets) & set(self.sources))
        if both:
            raise ValueError(f"{', '.join(modality_name(i) for i in both)} is both a source and the target modality: "
                             "translate from other modalities")
        if not 0.0 <= context_dropout < 1.0:
            raise ValueError(f"context_dropout must be in [0, 1), got {context_dropout}")
        self.random_source_subsets = random_source_subsets
        self.context_dropout = context_dropout
        self.null_label = null_label

    @property
    def in_context(self) -> bool:
        return bool(self.sources)

    def __call__(self, tokens: torch.Tensor, train: bool = True, generator: torch.Generator | None = None) -> dict:
        device = tokens.device
        batch = tokens.shape[0]
        if train:
            pick = torch.randint(len(self.targets), (batch,), generator=generator, device="cpu")
            target_label = torch.tensor(self.targets, device="cpu")[pick].to(device)
            rows = torch.arange(batch, device=device)
        else:  # every sample x every target modality, deterministic
            target_label = torch.tensor(self.targets, device=device).repeat(batch)
            rows = torch.arange(batch, device=device).repeat_interleave(len(self.targets))
        target_tokens = tokens[rows, target_label]
        source_tokens = source_labels = None
        if self.sources:
            source_tokens = tokens[rows][:, self.sources]
            source_labels = torch.tensor(self.sources, device=device).expand(len(rows), -1).clone()
            if train and self.random_source_subsets and len(self.sources) > 1:
                keep = torch.rand(len(rows), len(self.sources), generator=generator, device="cpu") < 0.5
                keep[torch.arange(len(rows)), torch.randint(len(self.sources), (len(rows),), generator=generator)] = True
                source_labels[~keep.to(device)] = -1
        if train and self.context_dropout > 0:
            drop = (torch.rand(len(rows), generator=generator, device="cpu") < self.context_dropout).to(device)
            target_label = torch.where(drop, torch.full_like(target_label, self.null_label), target_label)
            if source_labels is not None:
                source_labels[drop] = -1
        return {"target_tokens": target_tokens, "target_label": target_label, "source_tokens": source_tokens,
                "source_labels": source_labels, "rows": rows}


def control_inputs(batchdata: dict, rows: torch.Tensor, control_mask_key: str | None) -> dict:
    """ControlNet keyword inputs of the model rows: ``control_mask`` (B', D, H, W) from ``batchdata[key]``
    (B, 1, D, H, W); empty without a key (the stage-2 transformer)."""
    if control_mask_key is None:
        return {}
    return {"control_mask": batchdata[control_mask_key].to(rows.device)[rows, 0].long()}
