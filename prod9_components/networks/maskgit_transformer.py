"""Bidirectional masked-token transformer over FSQ token grids (MaskGiT stage 2, Chang et al., CVPR 2022).

One class serves both stage-2 bundles. The sequence is ``[context][target tokens]`` where the context is built by
:class:`ModalityProcessor`: zero or more (modality label, source token grid) pairs followed by the target-label
token. Label-conditional generation is the special case with no sources.

Classifier-free guidance convention: the unconditional ("null") context is ``target_label = null_label`` and
``source_tokens=None``; :meth:`TransformerDecoderSingleStream.null_context` returns that label tensor. Training
reaches it by context dropout (replace the label by ``null_label`` and drop the sources for some samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prod9_components.networks.fsq import FiniteScalarQuantizer, code_digits
from prod9_components.networks.modality_processor import ModalityProcessor
from prod9_components.networks.token_head import linear_token_loss

__all__ = ["TransformerDecoderSingleStream"]

MAX_CODE_LEVEL = 64  # the largest FSQ level code_levels accepts


class SelfAttention(nn.Module):
    """Multi-head bidirectional self-attention with ``F.scaled_dot_product_attention``."""

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).split(hidden, dim=2)
        # (B, L, hidden) -> (B, heads, L, head_dim)
        q, k, v = (t.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=False
        )
        y = y.transpose(1, 2).reshape(batch, length, hidden)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, hidden_dim: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        inner = int(hidden_dim * mlp_ratio)
        self.fc = nn.Linear(hidden_dim, inner)
        self.proj = nn.Linear(inner, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)
        self.attn = SelfAttention(hidden_dim, num_heads, dropout)
        self.ln_2 = nn.LayerNorm(hidden_dim)
        self.mlp = MLP(hidden_dim, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class TransformerDecoderSingleStream(nn.Module):
    """
    Masked-token transformer predicting FSQ token logits for a target grid given a modality context.

    Embeddings: token embedding with ``codebook_size + 1`` rows (the last is the learned [MASK]); a 3D position
    embedding, the sum of learned per-axis tables indexed by the token's absolute place in the case's token grid
    (``grid_origin`` + its place in the crop), so voxel (z, y, x) gets the same position vector in every source and
    in the target however long the context is, and a model trained on crops knows where a crop lies when it sees
    the whole grid; a modality embedding (inside :class:`ModalityProcessor`) added
    to every source token, used as the target-label token, and added to every target token.

    Args:
        codebook_size: FSQ vocabulary size K; token ids are in [0, K), K itself is the [MASK] id.
        hidden_dim: embedding width.
        num_layers: number of transformer blocks.
        num_heads: attention heads (must divide ``hidden_dim``).
        num_modalities: number of modality labels; label ``num_modalities`` is the null label (guidance).
        max_context_length: the largest number of source grids S accepted.
        max_grid_size: largest token grid (d, h, w) the position tables cover.
        mlp_ratio: MLP width as a multiple of ``hidden_dim``.
        dropout: dropout on embeddings, attention weights and residual branches.
        aligned_sources: also add each present source's token + modality embedding at the same voxel to the target
            token's input (their mean over the present sources): translation is mostly a per-voxel map, which
            attention alone finds only after many steps (off in checkpoints made before it existed).
        code_levels: the FSQ levels of the tokens (their product is ``codebook_size``; token id -> one digit per
            FSQ channel as :class:`~prod9_components.networks.fsq.FiniteScalarQuantizer` numbers them). When given,
            token embeddings and head rows also get a learned vector per (channel, digit): ids that share a digit
            share it, so what is learned about one code carries to its neighbours on the FSQ grid, instead of each
            of the K ids being learned alone. None: one free vector per id (checkpoints made before it existed).

    Shapes:
        target_tokens: (B, d, h, w) int64 in [0, K], K at masked positions.
        target_label: (B,) int64 in [0, num_modalities].
        source_tokens: (B, S, d, h, w) int64 in [0, K) or None; source_labels: (B, S) int64, -1 = absent source.
        grid_origin: (B, 3) int64, the case-grid index of each crop's first token (negative where the crop was
            padded; padded cells share position 0), or None for whole grids (origin 0).
        positions: (B, d, h, w) bool or None: the target positions to score (training: the masked ones).
        output: logits (B, K, d, h, w) for the target positions (channel-first, for ``F.cross_entropy``); with
            ``positions``, logits (M, K) of its M True positions only, in row-major (b, z, y, x) order, the order
            of ``target_tokens[positions]`` — the training path: the head never sees the other positions.
        targets: (M,) int64 or None: with ``positions``, the true tokens ``target_tokens[positions]`` would have;
            the output is then their loss dict (:func:`linear_token_loss`: ``loss``, ``token_accuracy``), computed
            without holding the (M, K) logits.
        target_weights: (M,) float or None: with ``targets``, each position's weight in the mean loss (None: equal).
        code_weight: with ``targets``, the weight of the expected code's squared error in the loss (needs
            ``code_levels``; the loss dict then also has ``code_error``).
    """

    def __init__(
        self,
        codebook_size: int,
        hidden_dim: int = 512,
        num_layers: int = 12,
        num_heads: int = 8,
        num_modalities: int = 4,
        max_context_length: int = 8,
        max_grid_size: Sequence[int] = (64, 64, 64),
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        aligned_sources: bool = False,
        code_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        max_grid_size = [int(s) for s in max_grid_size]
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}.")
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads}).")
        if len(max_grid_size) != 3 or min(max_grid_size) < 1:
            raise ValueError(f"max_grid_size must be three positive sizes (d, h, w), got {max_grid_size}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        # Checkpoints store these; TransformerDecoderSingleStream(**init_args) rebuilds the same network.
        self.init_args = {
            "codebook_size": int(codebook_size),
            "hidden_dim": int(hidden_dim),
            "num_layers": int(num_layers),
            "num_heads": int(num_heads),
            "num_modalities": int(num_modalities),
            "max_context_length": int(max_context_length),
            "max_grid_size": max_grid_size,
            "mlp_ratio": float(mlp_ratio),
            "dropout": float(dropout),
            "aligned_sources": bool(aligned_sources),
            "code_levels": None if code_levels is None else [int(level) for level in code_levels],
        }
        self.max_grid_size = tuple(max_grid_size)

        self.token_embedding = nn.Embedding(codebook_size + 1, hidden_dim)  # last row: [MASK]
        self.axis_positions = nn.ModuleList([nn.Embedding(size, hidden_dim) for size in max_grid_size])
        self.context = ModalityProcessor(num_modalities, hidden_dim, max_context_length)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(hidden_dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers)])
        self.ln_f = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, codebook_size)  # never predicts [MASK]
        if code_levels is not None:
            levels = self.init_args["code_levels"]
            # FSQ levels are small (2..MAX_CODE_LEVEL); the bound also keeps the (K, sum(levels)) digit table small
            # whatever a checkpoint record claims (one level of 15,360 would be a 1 GB table).
            if not levels or not all(2 <= level <= MAX_CODE_LEVEL for level in levels):
                raise ValueError(f"code_levels must be FSQ levels in [2, {MAX_CODE_LEVEL}], got {levels}.")
            if math.prod(levels) != codebook_size:
                raise ValueError(f"code_levels {levels} make {math.prod(levels)} codes, "
                                 f"not codebook_size {codebook_size}.")
            digits = code_digits(self.init_args["code_levels"])  # (K, sum(levels)) one-hot digits
            self.register_buffer("code_digits", torch.cat([digits, torch.zeros_like(digits[:1])]), persistent=False)
            # (K, C) the FSQ code of every id, for the expected-code term of the training loss (code_weight).
            self.register_buffer("codes", FiniteScalarQuantizer(levels).codebook(), persistent=False)
            self.code_embedding = nn.Linear(digits.shape[1], hidden_dim, bias=False)  # [MASK] row: no digits
            self.code_head = nn.Linear(hidden_dim, digits.shape[1], bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def token_table(self) -> torch.Tensor:
        """Embedding of every id (K + 1, hidden), [MASK] last: the id's own row plus its FSQ digits' vectors."""
        if self.init_args["code_levels"] is None:
            return self.token_embedding.weight
        return self.token_embedding.weight + self.code_embedding(self.code_digits)

    def head_weight(self) -> torch.Tensor:
        """Output head rows (K, hidden): the id's own row plus its FSQ digits' rows."""
        if self.init_args["code_levels"] is None:
            return self.head.weight
        return self.head.weight + self.code_digits[:-1] @ self.code_head.weight

    @property
    def codebook_size(self) -> int:
        return self.init_args["codebook_size"]

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size

    @property
    def null_label(self) -> int:
        return self.context.null_label

    def null_context(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Target labels (B,) of the unconditional context; call ``forward`` with them and ``source_tokens=None``."""
        return torch.full((batch,), self.null_label, dtype=torch.int64, device=device)

    def position_embedding(self, grid: Sequence[int], grid_origin: torch.Tensor | None = None) -> torch.Tensor:
        """3D position vectors (B or 1, d*h*w, hidden) of a (d, h, w) crop at ``grid_origin`` (B, 3), row-major."""
        grid = tuple(int(s) for s in grid)
        if len(grid) != 3:
            raise ValueError(f"token grid must be (d, h, w), got {grid}.")
        device = self.axis_positions[0].weight.device
        origin = torch.zeros(1, 3, dtype=torch.int64, device=device) if grid_origin is None else grid_origin.long()
        if origin.ndim != 2 or origin.shape[1] != 3:
            raise ValueError(f"grid_origin must be (B, 3), got shape {tuple(origin.shape)}.")
        axes = []
        for a, (table, size, limit) in enumerate(zip(self.axis_positions, grid, self.max_grid_size)):
            index = (origin[:, a, None] + torch.arange(size, device=origin.device)).clamp(min=0)  # (B, size)
            # Checked in eager mode only: under torch.compile a data-dependent branch would break the graph.
            if not torch.compiler.is_compiling() and int(index.max()) >= limit:
                raise ValueError(f"token grid {grid} at origin {origin.tolist()} exceeds max_grid_size "
                                 f"{self.max_grid_size}; build the model with a larger max_grid_size.")
            axes.append(table(index))  # (B, size, hidden)
        z, y, x = axes
        positions = z[:, :, None, None] + y[:, None, :, None] + x[:, None, None, :]
        return positions.reshape(origin.shape[0], -1, positions.shape[-1])

    def _check_tokens(self, tokens: torch.Tensor, name: str) -> None:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be integer token ids, got dtype {tokens.dtype}.")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() > self.mask_token_id):
            raise ValueError(
                f"{name} must be in [0, {self.mask_token_id}] ({self.mask_token_id} = [MASK]), "
                f"got range [{int(tokens.min())}, {int(tokens.max())}]."
            )

    def embed_target(self, target_tokens: torch.Tensor, target_label: torch.Tensor,
                     grid_origin: torch.Tensor | None = None) -> torch.Tensor:
        """Token + 3D position + target-label modality embedding: (B, d, h, w) -> (B, d*h*w, hidden)."""
        if target_tokens.ndim != 4:
            raise ValueError(f"target_tokens must be (B, d, h, w), got shape {tuple(target_tokens.shape)}.")
        self._check_tokens(target_tokens, "target_tokens")
        positions = self.position_embedding(target_tokens.shape[1:], grid_origin)
        tokens = F.embedding(target_tokens.flatten(1), self.token_table())  # (B, N, hidden)
        return tokens + positions + self.context.embed_label(target_label)[:, None]

    def embed_sources(self, source_tokens: torch.Tensor, grid_origin: torch.Tensor | None = None) -> torch.Tensor:
        """Token + 3D position embedding of source grids: (B, S, d, h, w) -> (B, S, d*h*w, hidden).

        The modality embedding is added by :class:`ModalityProcessor`.
        """
        if source_tokens.ndim != 5:
            raise ValueError(f"source_tokens must be (B, S, d, h, w), got shape {tuple(source_tokens.shape)}.")
        self._check_tokens(source_tokens, "source_tokens")
        positions = self.position_embedding(source_tokens.shape[2:], grid_origin)
        return F.embedding(source_tokens.flatten(2), self.token_table()) + positions[:, None]

    def aligned_sources(self, source_tokens: torch.Tensor, source_labels: torch.Tensor) -> torch.Tensor:
        """Mean over the present sources (label >= 0) of token + modality embedding, per voxel:
        (B, S, d, h, w), (B, S) -> (B, d*h*w, hidden); zero where no source is present (the null context)."""
        present = (source_labels >= 0).to(self.token_embedding.weight.dtype)  # (B, S)
        embedded = F.embedding(source_tokens.flatten(2), self.token_table()) + self.context.embed_label(
            source_labels.clamp(min=0))[:, :, None]  # (B, S, N, hidden)
        total = (embedded * present[:, :, None, None]).sum(1)
        return total / present.sum(1).clamp(min=1)[:, None, None]

    def embed_sequence(
        self,
        target_tokens: torch.Tensor,
        target_label: torch.Tensor,
        source_tokens: torch.Tensor | None = None,
        source_labels: torch.Tensor | None = None,
        grid_origin: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The block input ``[context][target]`` (B, L, hidden), its SDPA mask (None when nothing is padded) and
        the context length; :meth:`forward` = this, the blocks, then :meth:`logits`."""
        batch, d, h, w = target_tokens.shape
        if tuple(target_label.shape) != (batch,):
            raise ValueError(f"target_label must be (B={batch},), got shape {tuple(target_label.shape)}.")
        if grid_origin is not None and tuple(grid_origin.shape) != (batch, 3):
            raise ValueError(f"grid_origin must be (B={batch}, 3), got shape {tuple(grid_origin.shape)}.")
        target = self.embed_target(target_tokens, target_label, grid_origin)
        sources = None
        if source_tokens is not None:
            if source_tokens.ndim != 5 or source_tokens.shape[0] != batch or source_tokens.shape[2:] != (d, h, w):
                raise ValueError(
                    f"source_tokens must be (B={batch}, S, {d}, {h}, {w}) like the target grid, "
                    f"got shape {tuple(source_tokens.shape)}."
                )
            sources = self.embed_sources(source_tokens, grid_origin)
        context, context_padding = self.context(sources, source_labels, target_label)
        if sources is not None and self.init_args["aligned_sources"]:
            target = target + self.aligned_sources(source_tokens, source_labels)

        x = self.embedding_dropout(torch.cat([context.to(target.dtype), target], dim=1))
        # Bool SDPA mask, True = attend; None keeps the fused kernels when nothing is padded.
        attn_mask = None
        if context_padding.any():
            keep = torch.cat([~context_padding, torch.ones_like(context_padding[:, :1]).expand(batch, d * h * w)], 1)
            attn_mask = keep[:, None, None, :]
        return x, attn_mask, context.shape[1]

    def logits(self, x: torch.Tensor, context_length: int, grid: Sequence[int],
               positions: torch.Tensor | None = None, targets: torch.Tensor | None = None,
               target_weights: torch.Tensor | None = None, code_weight: float = 0.0,
               ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits (B, K, d, h, w) of the target positions of the last block's output ``x`` (B, L, hidden); with
        ``positions`` (B, d, h, w) bool, logits (M, K) of its M True positions only (row-major order); with
        ``targets`` (M,) too, their loss instead (:func:`linear_token_loss`, weighted by ``target_weights``, plus
        ``code_weight`` x the expected code's squared error: the logits are never held)."""
        target = x[:, context_length:]  # (B, N, hidden)
        if positions is None:
            logits = F.linear(self.ln_f(target), self.head_weight(), self.head.bias)  # (B, N, K)
            return logits.transpose(1, 2).reshape(x.shape[0], self.codebook_size, *grid)
        expected = (x.shape[0], *(int(s) for s in grid))
        if positions.dtype != torch.bool or tuple(positions.shape) != expected:
            raise ValueError(f"positions must be a bool tensor of shape {expected}, "
                             f"got {positions.dtype} {tuple(positions.shape)}.")
        # Layer norm and head act per row, so gathering the rows first gives the same logits for them.
        rows = self.ln_f(target[positions.flatten(1)])  # (M, hidden)
        if targets is None:
            return F.linear(rows, self.head_weight(), self.head.bias)  # (M, K)
        if code_weight and self.init_args["code_levels"] is None:
            raise ValueError("code_weight needs a transformer built with code_levels (the FSQ codes of its ids).")
        return linear_token_loss(rows, self.head_weight(), self.head.bias, targets, target_weights,
                                 self.codes if code_weight else None, code_weight)

    def forward(
        self,
        target_tokens: torch.Tensor,
        target_label: torch.Tensor,
        source_tokens: torch.Tensor | None = None,
        source_labels: torch.Tensor | None = None,
        grid_origin: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        target_weights: torch.Tensor | None = None,
        code_weight: float = 0.0,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        x, attn_mask, context_length = self.embed_sequence(target_tokens, target_label, source_tokens,
                                                           source_labels, grid_origin)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.logits(x, context_length, target_tokens.shape[1:], positions, targets, target_weights,
                           code_weight)
