"""Iterative MaskGiT decoding (Chang et al., "MaskGIT: Masked Generative Image Transformer", CVPR 2022).

Start from an all-[MASK] grid. Each of ``num_steps`` steps (the bundles' ``num_inference_steps``) predicts every
still-masked token, samples a candidate, and fixes the most confident candidates; fixed tokens are never revisited,
and the last step fixes all that remain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from prod9_components.sampling.schedules import mask_ratio
from prod9_components.sampling.steps import check_num_steps, check_scale

__all__ = ["MaskGiTSampler", "categorical_noise", "guided_logits", "sample_categorical"]


def guided_logits(cond: torch.Tensor | None, uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + s * (cond - uncond)`` (the diffusers / MONAI convention, as MAISI's).

    ``s = 1`` is exactly the conditional model and ``s = 0`` exactly the unconditional one; the side not needed
    then may be None (the sampler skips that forward pass).
    """
    if guidance_scale == 1:
        return cond
    if guidance_scale == 0:
        return uncond
    return uncond + guidance_scale * (cond - uncond)


def _gumbel(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Drawn where the generator lives, then moved: a CPU generator (what the generation loop seeds) serves a CUDA
    # model, and one seed draws the same numbers on every device.
    where = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=where).to(device).clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def _blocks(num_codes: int) -> tuple[int, int]:
    """``(blocks, size)``: ``num_codes`` cut into blocks of ``size = ceil(sqrt(num_codes))`` codes."""
    size = math.isqrt(num_codes - 1) + 1
    return -(-num_codes // size), size


def categorical_noise(rows: Sequence[int], num_codes: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The Gumbel noise of :func:`sample_categorical` for rows of ``num_codes`` logits: (*rows, blocks + size)."""
    return _gumbel((*rows, sum(_blocks(num_codes))), generator, torch.device(device or "cpu"))


def sample_categorical(logits: torch.Tensor, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw from ``softmax(logits)`` per row by Gumbel-max in two levels, and its log-probability.

    The K codes are cut into blocks of ``ceil(sqrt(K))``; Gumbel-max picks a block by its log-sum-exp, then a code
    inside it: the same distribution as Gumbel-max over all K codes, from about ``2 sqrt(K)`` noise numbers instead of
    K (one per code took two thirds of a demo sampling run over a 15,360-code vocabulary). Gumbel-max keeps a draw
    where the logits change little: two runs from one noise draw the same codes wherever their logits nearly agree
    (at total variation 0.02, 3.6% of the draws differ; inverse transform sampling changed 64%).

    Args:
        logits: (..., K) float.
        noise: (..., blocks + size) from :func:`categorical_noise`; None: drawn here from ``generator``.
        generator: for reproducible draws when ``noise`` is None.

    Returns:
        (...,) int64 draws in [0, K) and (...,) float their log-probabilities.
    """
    rows, num_codes = logits.shape[:-1], logits.shape[-1]
    blocks, size = _blocks(num_codes)
    if noise is None:
        noise = categorical_noise(rows, num_codes, generator, logits.device)
    # The blocks are views of the logits (a padded copy of them cost a third of a step); the last one may be short.
    full = num_codes // size
    block_lse = logits[..., :full * size].view(*rows, full, size).logsumexp(dim=-1)  # (..., blocks)
    if full < blocks:
        block_lse = torch.cat([block_lse, logits[..., full * size:].logsumexp(dim=-1, keepdim=True)], dim=-1)
    block = (block_lse + noise[..., :blocks]).argmax(dim=-1)  # (...,)
    codes = block[..., None] * size + torch.arange(size, device=logits.device)  # (..., size): the block's codes
    inside = logits.gather(-1, codes.clamp(max=num_codes - 1)).masked_fill(codes >= num_codes, float("-inf"))
    draws = block * size + (inside + noise[..., blocks:]).argmax(dim=-1)
    return draws, logits.gather(-1, draws[..., None]).squeeze(-1) - block_lse.logsumexp(dim=-1)


class MaskGiTSampler:
    """
    MaskGiT sampler for :class:`~prod9_components.networks.maskgit_transformer.TransformerDecoderSingleStream`.

    Step ``t`` (0-based) of ``T``:

    1. logits from the model (conditional; with ``guidance_scale = s != 1`` also the null context,
       ``target_label = null_label`` and no sources, combined as ``uncond + s * (cond - uncond)``);
    2. a candidate token for each masked position drawn from ``softmax(logits / sampling_temperature)``
       (:func:`sample_categorical`; ``sampling_temperature = 0``: argmax);
    3. confidence = log-probability of the candidate + ``temperature * (1 - (t + 1) / T)`` times fresh Gumbel
       noise: the noise is annealed linearly from ``temperature * (1 - 1/T)`` to 0 at the last step, so early
       steps explore which positions to fix and the last steps pick by the model's confidence alone;
    4. the most confident masked positions are fixed so that ``floor(mask_ratio((t + 1) / T) * N)`` stay masked
       (at least one fewer than before the step, none after the last step). Fixed positions never change.

    Args:
        num_steps: number of decoding steps T (>= 1).
        schedule: mask schedule, one of ``prod9_components.sampling.schedules.SCHEDULES``.
        temperature: initial scale of the Gumbel noise on the confidence.
        guidance_scale: classifier-free guidance scale s >= 0; 1 = the conditional model alone (no guidance),
            0 = the unconditional model alone, > 1 = stronger conditioning.
        sampling_temperature: softmax temperature of the candidate tokens.
    """

    def __init__(
        self,
        num_steps: int = 12,
        schedule: str = "cosine",
        temperature: float = 4.5,
        guidance_scale: float = 1.0,
        sampling_temperature: float = 1.0,
    ) -> None:
        self.num_steps = check_num_steps(num_steps)
        guidance_scale = check_scale("guidance_scale", guidance_scale)
        mask_ratio(0.0, schedule)  # unknown schedule -> ValueError listing the valid ones
        if temperature < 0 or sampling_temperature < 0:
            raise ValueError(
                f"temperature and sampling_temperature must be >= 0, got {temperature}, {sampling_temperature}."
            )
        self.schedule = schedule
        self.temperature = float(temperature)
        self.guidance_scale = float(guidance_scale)
        self.sampling_temperature = float(sampling_temperature)

    def masked_counts(self, num_masked: torch.Tensor) -> list[torch.Tensor]:
        """Masked-token count after each step for samples starting with ``num_masked`` (B,) masked tokens."""
        counts, before = [], num_masked
        for t in range(self.num_steps):
            if t == self.num_steps - 1:
                after = torch.zeros_like(before)
            else:
                ratio = mask_ratio((t + 1) / self.num_steps, self.schedule)
                after = torch.floor(ratio * num_masked.double()).long()
                after = torch.minimum(after, before - 1).clamp(min=0)  # progress every step
            counts.append(after)
            before = after
        return counts

    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        shape: Sequence[int],
        target_label: torch.Tensor,
        source_tokens: torch.Tensor | None = None,
        source_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        initial_tokens: torch.Tensor | None = None,
        fixed_mask: torch.Tensor | None = None,
        grid_origin: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """
        Generate a token grid.

        Args:
            model: a ``TransformerDecoderSingleStream`` (or anything with its forward signature, ``mask_token_id``
                and ``null_label``); called with ``positions`` (B, d, h, w) bool, the masked positions, it returns
                their logits (M, K) in row-major order; run in eval mode, its training mode is restored afterwards.
            shape: (B, d, h, w) token grid.
            target_label: (B,) int64 target modality labels.
            source_tokens, source_labels: (B, S, d, h, w) and (B, S) in-context sources, or None.
            generator: for reproducible samples, on any device (a CPU one draws the same numbers for every device).
            initial_tokens: (B, d, h, w) tokens to keep (inpainting); with ``fixed_mask`` None, every position
                that is not ``mask_token_id`` is kept.
            fixed_mask: (B, d, h, w) bool, True = keep ``initial_tokens`` there.
            grid_origin: (B, 3) place of the grid inside the case's token grid (None: the grid starts at 0).
            model_kwargs: more keyword inputs of every model call (a ControlNet's ``control_mask``).

        Returns:
            (B, d, h, w) int64 tokens in [0, codebook_size), no [MASK] left.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise ValueError(f"shape must be (B, d, h, w), got {shape}.")
        device = target_label.device
        mask_id = int(model.mask_token_id)
        batch, num_tokens = shape[0], shape[1] * shape[2] * shape[3]

        tokens = torch.full((batch, num_tokens), mask_id, dtype=torch.int64, device=device)
        if initial_tokens is not None:
            if tuple(initial_tokens.shape) != shape:
                raise ValueError(f"initial_tokens must have shape {shape}, got {tuple(initial_tokens.shape)}.")
            keep = (initial_tokens != mask_id) if fixed_mask is None else fixed_mask.bool()
            if tuple(keep.shape) != shape:
                raise ValueError(f"fixed_mask must have shape {shape}, got {tuple(keep.shape)}.")
            kept = initial_tokens[keep]
            if kept.numel() and (kept.min() < 0 or kept.max() >= mask_id):
                raise ValueError(f"fixed initial_tokens must be in [0, {mask_id}).")
            tokens = torch.where(keep.flatten(1), initial_tokens.flatten(1).long(), tokens)
        elif fixed_mask is not None:
            raise ValueError("fixed_mask needs initial_tokens (the values to keep).")

        model_kwargs = model_kwargs or {}
        masked = tokens == mask_id  # (B, N)
        counts = self.masked_counts(masked.sum(dim=1))
        null_label = torch.full_like(target_label, int(model.null_label))

        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            for t in range(self.num_steps):
                if not masked.any():
                    break
                grid, positions = tokens.view(shape), masked.view(shape)
                # Each side is computed only when guidance needs it (s == 1: cond alone; s == 0: uncond alone), and
                # only at the masked positions (fixed ones are never re-picked): the head over all K codes and the
                # softmax below are most of a step's work for a large codebook.
                cond = (model(grid, target_label, source_tokens, source_labels, grid_origin, positions=positions,
                              **model_kwargs) if self.guidance_scale != 0 else None)
                uncond = (model(grid, null_label, grid_origin=grid_origin, positions=positions, **model_kwargs)
                          if self.guidance_scale != 1 else None)
                open_logits = guided_logits(cond, uncond, self.guidance_scale).float()  # (M, K), row-major order

                # Candidates ~ softmax(logits / tau); their confidence starts as their log-probability. Every
                # position draws its own noise, masked or not: two runs from one seed (a mask vs an empty mask) then
                # draw each position alike wherever their logits nearly agree.
                if self.sampling_temperature > 0:
                    noise = categorical_noise(masked.shape, open_logits.shape[-1], generator, device)[masked]
                    tau = self.sampling_temperature
                    drawn, log_prob = sample_categorical(open_logits if tau == 1 else open_logits / tau, noise)
                else:
                    drawn = open_logits.argmax(dim=-1)
                    log_prob = open_logits.gather(-1, drawn[:, None])[:, 0] - torch.logsumexp(open_logits, dim=-1)
                candidates = tokens.masked_scatter(masked, drawn)
                confidence = torch.full(masked.shape, float("-inf"), device=device).masked_scatter(masked, log_prob)
                noise_scale = self.temperature * (1.0 - (t + 1) / self.num_steps)
                confidence = confidence + noise_scale * _gumbel(confidence.shape, generator, device)

                # Fix the `num_fix` most confident masked positions of each sample.
                num_fix = masked.sum(dim=1) - counts[t]
                ranks = confidence.argsort(dim=1, descending=True).argsort(dim=1)
                fix = masked & (ranks < num_fix[:, None])
                tokens = torch.where(fix, candidates, tokens)
                masked = masked & ~fix
        finally:
            if was_training and hasattr(model, "train"):
                model.train()
        if masked.any():  # unreachable by construction; guards trap 4 (DESIGN §4)
            raise RuntimeError("MaskGiT sampling ended with masked positions left.")
        return tokens.view(shape)

    @torch.no_grad()
    def expected_codes(
        self,
        model: torch.nn.Module,
        codebook: torch.Tensor,
        shape: Sequence[int],
        target_label: torch.Tensor,
        source_tokens: torch.Tensor | None = None,
        source_labels: torch.Tensor | None = None,
        grid_origin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        The code each target position is expected to take, instead of a sample: one pass of the model with every
        target token masked (guided as in :meth:`sample`), ``softmax(logits / sampling_temperature) @ codebook``.

        A sample draws each token from a spread-out distribution and pays for every wrong draw; the expected code is
        the estimate with the least squared error in code space (deterministic: no generator). On the demo's T1 -> T2
        translation (80 cases, 8 test cases) it decodes to 18.3 dB / SSIM 0.71 against a 12-step sample's 16.9 / 0.65.
        ``sampling_temperature = 0`` gives the code of the most likely token.

        Args:
            model, shape, target_label, source_tokens, source_labels, grid_origin: as in :meth:`sample`.
            codebook: (K, C) the FSQ code of every token id (``fsq.codebook()``), on the model's device.

        Returns:
            (B, C, d, h, w) float32 codes, between the FSQ grid values (decode them with the stage-1 decoder).
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise ValueError(f"shape must be (B, d, h, w), got {shape}.")
        if codebook.ndim != 2 or codebook.shape[0] != model.codebook_size:
            raise ValueError(f"codebook must be (K, C) with K = {model.codebook_size}, got {tuple(codebook.shape)}.")
        masked = torch.full(shape, int(model.mask_token_id), dtype=torch.int64, device=target_label.device)
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            cond = (model(masked, target_label, source_tokens, source_labels, grid_origin)
                    if self.guidance_scale != 0 else None)
            uncond = (model(masked, torch.full_like(target_label, int(model.null_label)), grid_origin=grid_origin)
                      if self.guidance_scale != 1 else None)
        finally:
            model.train(was_training)
        logits = guided_logits(cond, uncond, self.guidance_scale).float()  # (B, K, d, h, w)
        if self.sampling_temperature > 0:
            weights = torch.softmax(logits / self.sampling_temperature, dim=1)
        else:
            weights = torch.nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).movedim(-1, 1).float()
        with torch.autocast(logits.device.type, enabled=False):  # float32 codes under an evaluator's bfloat16 AMP
            return torch.einsum("bk...,kc->bc...", weights, codebook.float())
