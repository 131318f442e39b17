"""Context builder of the stage-2 transformer: (modality label, source tokens) pairs followed by the target label.

Label-conditional generation is the same model with no sources, so its context is the target-label token alone;
the label ``num_modalities`` is the null label of classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ModalityProcessor"]


class ModalityProcessor(nn.Module):
    """
    Build the context part of the stage-2 sequence from already embedded source grids.

    Each source token gets its source's modality embedding added; the sources are concatenated in order and
    followed by one target-label token (the modality embedding of ``target_label``). Absent sources (label -1)
    are kept in place, so a batch can mix 1..S sources, and flagged in the padding mask.

    Args:
        num_modalities: number of real modality labels (T1=0, T1ce=1, T2=2, FLAIR=3). The embedding has one more
            row, the null label ``num_modalities`` used for classifier-free guidance.
        hidden_dim: embedding width.
        max_context_length: the largest number of sources S accepted.

    Shapes:
        source_embeddings: (B, S, N, hidden) token + position embedded source grids (N = d*h*w), or None / S = 0
            for no sources.
        source_labels: (B, S) int64, modality labels in [0, num_modalities), -1 marks an absent source.
        target_label: (B,) int64 in [0, num_modalities]; ``num_modalities`` is the null label.
        output: context (B, S*N + 1, hidden) and context_padding_mask (B, S*N + 1) bool, True = ignore.
    """

    def __init__(self, num_modalities: int = 4, hidden_dim: int = 512, max_context_length: int = 8) -> None:
        super().__init__()
        if num_modalities < 1 or hidden_dim < 1 or max_context_length < 1:
            raise ValueError(
                "num_modalities, hidden_dim and max_context_length must be >= 1, got "
                f"{num_modalities}, {hidden_dim}, {max_context_length}."
            )
        self.num_modalities = int(num_modalities)
        self.hidden_dim = int(hidden_dim)
        self.max_context_length = int(max_context_length)
        self.modality_embedding = nn.Embedding(self.num_modalities + 1, self.hidden_dim)

    @property
    def null_label(self) -> int:
        return self.num_modalities

    def embed_label(self, labels: torch.Tensor) -> torch.Tensor:
        """Modality embedding of labels in [0, num_modalities] (any shape -> shape + (hidden,))."""
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_modalities):
            raise ValueError(
                f"modality labels must be in [0, {self.num_modalities}] ({self.num_modalities} = null), "
                f"got {labels.tolist()}."
            )
        return self.modality_embedding(labels)

    def forward(
        self, source_embeddings: torch.Tensor | None, source_labels: torch.Tensor | None, target_label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if target_label.ndim != 1:
            raise ValueError(f"target_label must be (B,), got shape {tuple(target_label.shape)}.")
        batch = target_label.shape[0]
        label_token = self.embed_label(target_label)[:, None]  # (B, 1, hidden)
        label_padding = torch.zeros(batch, 1, dtype=torch.bool, device=target_label.device)
        if source_embeddings is None or source_embeddings.shape[1] == 0:
            return label_token, label_padding

        if source_embeddings.ndim != 4 or source_embeddings.shape[0] != batch:
            raise ValueError(
                f"source_embeddings must be (B={batch}, S, N, hidden), got shape {tuple(source_embeddings.shape)}."
            )
        _, num_sources, num_tokens, hidden = source_embeddings.shape
        if num_sources > self.max_context_length:
            raise ValueError(
                f"{num_sources} sources exceed max_context_length={self.max_context_length}; "
                "build the model with a larger max_context_length."
            )
        if source_labels is None or tuple(source_labels.shape) != (batch, num_sources):
            got = None if source_labels is None else tuple(source_labels.shape)
            raise ValueError(f"source_labels must be (B={batch}, S={num_sources}) with -1 for padding, got {got}.")
        if source_labels.min() < -1 or source_labels.max() >= self.num_modalities:
            raise ValueError(
                f"source_labels must be in [0, {self.num_modalities}) or -1 (padding), got {source_labels.tolist()}."
            )

        absent = source_labels < 0  # (B, S)
        modality = self.modality_embedding(source_labels.clamp(min=0))  # (B, S, hidden); padded rows are masked below
        sources = (source_embeddings + modality[:, :, None]).reshape(batch, num_sources * num_tokens, hidden)
        padding = absent[:, :, None].expand(batch, num_sources, num_tokens).reshape(batch, num_sources * num_tokens)
        context = torch.cat([sources, label_token.to(sources.dtype)], dim=1)
        return context, torch.cat([padding, label_padding], dim=1)
