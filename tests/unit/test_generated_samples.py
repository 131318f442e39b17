import pytest
import torch
from ignite.engine import Engine, Events

from prod9_components.data.brats import discover_cases
from prod9_components.engines.tokenizer import CaseTokenizer
from prod9_components.handlers.maskgit_samples import MaskGiTSamplesHandler
from prod9_components.handlers.sample_scorer import real_volumes
from prod9_components.metrics.generation import real_reference
from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ
from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream
from prod9_components.sampling.maskgit import MaskGiTSampler

GRID = [14, 14, 14]  # decoded 28^3: the smallest volume MS-SSIM accepts
SCORES = {"brain_dice", "real_brain_dice", "intensity_w1", "real_intensity_w1", "gradient_w1", "real_gradient_w1",
          "sample_ms_ssim", "real_ms_ssim", "nearest_training_distance", "real_nearest_training_distance",
          "memorised_fraction"}


@pytest.fixture(scope="module")
def cases(demo_dataset_dir) -> dict:
    found = discover_cases(demo_dataset_dir)
    return {"held_out": found[:1], "training": found[1:3]}


def _run(sampler: MaskGiTSampler, cases: dict, tmp_path=None, epochs: int = 1) -> tuple[dict, list, CaseTokenizer]:
    torch.manual_seed(0)
    autoencoder = AutoencoderFSQ(num_channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, False),
                                 norm_num_groups=4, levels=(5, 5, 5)).eval()
    net = TransformerDecoderSingleStream(autoencoder.codebook_size, hidden_dim=32, num_layers=1, num_heads=4,
                                         max_grid_size=GRID)
    encoder = CaseTokenizer(autoencoder, spacing=(4.0, 4.0, 4.0))
    handler = MaskGiTSamplesHandler(net, autoencoder, sampler, ["T1", "FLAIR"], GRID, encoder, cases["held_out"],
                                      cases["training"], num_samples=3,
                                      log_dir=None if tmp_path is None else str(tmp_path))
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    history = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: history.append(dict(e.state.metrics)))
    engine.run([0], max_epochs=epochs)
    return engine.state.metrics, history, encoder


def test_identical_samples_score_one_and_random_ones_less(one_thread, cases, tmp_path):
    # Greedy decoding without confidence noise: every seed gives the same volume -> MS-SSIM exactly 1 (collapse).
    greedy, _, _ = _run(MaskGiTSampler(num_steps=2, temperature=0.0, sampling_temperature=0.0), cases)
    assert greedy["sample_ms_ssim_T1"] == pytest.approx(1.0, abs=1e-5)
    assert greedy["sample_ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    # Sampling (untrained model, near-uniform logits): different seeds give different volumes.
    sampled, history, encoder = _run(MaskGiTSampler(num_steps=2), cases, tmp_path, epochs=2)
    assert set(sampled) == {f"{s}{m}" for s in SCORES for m in ("", "_T1", "_FLAIR")}
    assert 0.0 < sampled["sample_ms_ssim_T1"] < 0.99 and 0.0 < sampled["sample_ms_ssim_FLAIR"] < 0.99
    for key in ("sample_ms_ssim", "brain_dice", "real_ms_ssim"):  # the plain key: the mean over modalities
        assert sampled[key] == pytest.approx((sampled[f"{key}_T1"] + sampled[f"{key}_FLAIR"]) / 2)
    assert list(tmp_path.glob("events.out.tfevents.*"))  # mid slices went to TensorBoard
    # The real references: the held-out case against the training cases, on the samples' 28^3 grid.
    for name in ("T1", "FLAIR"):
        held_out = real_volumes(encoder, cases["held_out"], [name], [28, 28, 28])[name]
        training = real_volumes(encoder, cases["training"], [name], [28, 28, 28])[name]
        for key, value in real_reference(held_out, training).scores.items():
            assert sampled[f"{key}_{name}"] == pytest.approx(value, rel=1e-5), key
    assert 0.5 < sampled["real_brain_dice"] <= 1.0 and sampled["real_nearest_training_distance"] > 0.01
    # Untrained decoder output is no brain and no copy of a training case.
    assert sampled["memorised_fraction"] == 0.0
    assert sampled["nearest_training_distance"] > sampled["real_nearest_training_distance"]
    # The references are made once and kept (float16): a second evaluation scores the same seeds alike.
    assert history[1] == pytest.approx(history[0], abs=1e-3)


def test_needs_pairs_and_real_cases(cases):
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        MaskGiTSamplesHandler(None, None, None, ["T1"], GRID, None, cases["held_out"], cases["training"],
                                num_samples=1)
    with pytest.raises(ValueError, match="needs held-out and training cases, got 1 and 0"):
        MaskGiTSamplesHandler(None, None, None, ["T1"], GRID, None, cases["held_out"], [])


def test_a_disabled_handler_attaches_nothing_and_a_stray_word_is_refused(cases):
    """``enabled`` as a config hands it: the string "false" switches sampling off (bool() would count it as true)."""
    def handler(enabled):
        return MaskGiTSamplesHandler(None, None, None, ["T1"], GRID, None, cases["held_out"], cases["training"],
                                     enabled=enabled)

    for enabled, attached in (("false", False), (False, False), ("true", True), (True, True)):
        engine, samples = Engine(lambda engine, batch: None), handler(enabled)
        samples.attach(engine)
        assert engine.has_event_handler(samples, Events.EPOCH_COMPLETED) is attached, enabled
    with pytest.raises(ValueError, match="enabled must be true or false, got 'maybe'"):
        handler("maybe")
