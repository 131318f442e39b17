import pytest
import torch
from ignite.engine import Engine

from prod9_components.handlers.generated_samples import GeneratedSamplesHandler
from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ
from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream
from prod9_components.sampling.maskgit import MaskGiTSampler

GRID = [14, 14, 14]  # decoded 28^3: the smallest volume MS-SSIM accepts


def _run(sampler: MaskGiTSampler, tmp_path=None) -> dict:
    torch.manual_seed(0)
    autoencoder = AutoencoderFSQ(num_channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, False),
                                 norm_num_groups=4, levels=(5, 5, 5)).eval()
    net = TransformerDecoderSingleStream(autoencoder.codebook_size, hidden_dim=32, num_layers=1, num_heads=4,
                                         max_grid_size=GRID)
    handler = GeneratedSamplesHandler(net, autoencoder, sampler, ["T1", "FLAIR"], GRID, num_samples=3,
                                      log_dir=None if tmp_path is None else str(tmp_path))
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    return engine.state.metrics


def test_identical_samples_score_one_and_random_ones_less(one_thread, tmp_path):
    # Greedy decoding without confidence noise: every seed gives the same volume -> MS-SSIM exactly 1 (collapse).
    greedy = _run(MaskGiTSampler(num_steps=2, temperature=0.0, sampling_temperature=0.0))
    assert greedy["sample_ms_ssim_T1"] == pytest.approx(1.0, abs=1e-5)
    assert greedy["sample_ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    # Sampling (untrained model, near-uniform logits): different seeds give different volumes.
    sampled = _run(MaskGiTSampler(num_steps=2), tmp_path)
    assert set(sampled) == {"sample_ms_ssim", "sample_ms_ssim_T1", "sample_ms_ssim_FLAIR"}
    assert 0.0 < sampled["sample_ms_ssim_T1"] < 0.99 and 0.0 < sampled["sample_ms_ssim_FLAIR"] < 0.99
    assert list(tmp_path.glob("events.out.tfevents.*"))  # mid slices went to TensorBoard


def test_needs_pairs():
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        GeneratedSamplesHandler(None, None, None, ["T1"], GRID, num_samples=1)
