"""GPU-only: what a CUDA run does differently (skipped without CUDA; run on a GPU machine with
``pytest tests/gpu``; the bundle tests there run on CUDA with AMP, the bundles' default where CUDA is present).

The generation loop seeds a CPU ``torch.Generator`` per sample: a CUDA model must take it, and one seed must draw
the same sample on either device."""

from __future__ import annotations

import pytest
import torch

from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream
from prod9_components.sampling.maskgit import MaskGiTSampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GRID = (1, 4, 4, 4)


def sample(network: torch.nn.Module, device: str, seed: int) -> torch.Tensor:
    """12 MaskGiT steps of the label bundle's sampler, float32, from a CPU generator: (4, 4, 4) tokens on the CPU."""
    network = network.to(device)
    sampler = MaskGiTSampler(num_steps=12, schedule="cosine", guidance_scale=3.0)
    label = torch.tensor([0], device=device)
    return sampler.sample(network, GRID, label, generator=torch.Generator().manual_seed(seed))[0].cpu()


def test_maskgit_sampler_on_cuda_takes_a_cpu_generator_and_draws_the_cpu_sample():
    torch.manual_seed(0)
    network = TransformerDecoderSingleStream(codebook_size=64, hidden_dim=64, num_layers=2, num_heads=4,
                                             num_modalities=4, max_context_length=8, max_grid_size=[8, 8, 8],
                                             dropout=0.0).eval()
    on_cpu = sample(network, "cpu", seed=0)
    on_cuda = sample(network, "cuda", seed=0)
    other_seed = sample(network, "cuda", seed=1)
    same = (on_cuda == on_cpu).float().mean().item()
    assert same >= 0.9, f"CUDA and CPU samples of one seed agree on {same:.2f} of the tokens"
    # An untrained model's tokens are near-uniform draws: another seed agrees on few, so the match above is the seed's.
    assert (other_seed == on_cpu).float().mean().item() < 0.3
