"""In-context translation to expected FSQ codes (``MaskGiTSampler.expected_codes``, ``--expected-codes true``): the
softmax-weighted codebook of one pass of the model, decoded and written as a sample is.

The translation tests run the real preprocessing, autoencoder, decoder, inversion and NIfTI writing on 16^3 volumes;
the model is one that puts fixed logits at every position, so the expected codes are known in advance.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from prod9_components.data.transforms import preprocessing
from prod9_components.generation.maskgit import translate_volumes
from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ
from prod9_components.sampling.maskgit import MaskGiTSampler
from tests.helpers import t1_volumes

pytestmark = pytest.mark.usefixtures("one_thread")


class FixedLogits(nn.Module):
    """The same logits (K,) at every target position, whatever the context (an in-context transformer's interface)."""

    null_label = 4

    def __init__(self, logits: torch.Tensor, max_grid_size=(32, 32, 32)) -> None:
        super().__init__()
        self.register_buffer("fixed", logits.float())
        self.init_args = {"max_grid_size": list(max_grid_size)}
        self.calls = []

    codebook_size = property(lambda self: self.fixed.shape[0])
    mask_token_id = property(lambda self: self.fixed.shape[0])

    def forward(self, target_tokens, target_label, source_tokens=None, source_labels=None, grid_origin=None,
                positions=None):
        self.calls.append(target_tokens.clone())
        if positions is not None:  # a sampler's step: the logits of the masked positions, (M, K)
            return self.fixed[None].expand(int(positions.sum()), -1)
        b, d, h, w = target_tokens.shape
        return self.fixed[None, :, None, None, None].expand(b, -1, d, h, w)


CODEBOOK = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [0.5, -0.5], [1.0, 0.25]])  # 4 codes of 2 channels


def test_expected_codes_are_the_softmax_weighted_codebook():
    model = FixedLogits(torch.tensor([0.1, 0.2, 0.3, 0.4]).log())
    label = torch.zeros(2, dtype=torch.long)
    codes = MaskGiTSampler().expected_codes(model, CODEBOOK, (2, 3, 4, 5), label)
    assert codes.shape == (2, 2, 3, 4, 5)
    # 0.1 (-1, 0) + 0.2 (0, 1) + 0.3 (0.5, -0.5) + 0.4 (1, 0.25)
    torch.testing.assert_close(codes, torch.tensor([0.45, 0.15])[None, :, None, None, None].expand_as(codes))
    assert torch.equal(model.calls[0], torch.full((2, 3, 4, 5), 4))  # one pass, every target position masked
    # sampling_temperature sharpens the weights as it does a sample's softmax; 0 takes the most likely code
    tempered = MaskGiTSampler(sampling_temperature=0.5).expected_codes(model, CODEBOOK, (1, 1, 1, 1), label[:1])
    weights = torch.tensor([0.01, 0.04, 0.09, 0.16]) / 0.30
    torch.testing.assert_close(tempered.flatten(), weights @ CODEBOOK)
    argmax = MaskGiTSampler(sampling_temperature=0).expected_codes(model, CODEBOOK, (1, 1, 1, 1), label[:1])
    assert torch.equal(argmax.flatten(), CODEBOOK[3])
    with pytest.raises(ValueError, match=r"codebook must be \(K, C\) with K = 4, got \(3, 2\)"):
        MaskGiTSampler().expected_codes(model, CODEBOOK[:3], (1, 1, 1, 1), label[:1])


def _translate(model, items, out, **kwargs) -> np.ndarray:
    torch.manual_seed(0)
    autoencoder = AutoencoderFSQ(num_channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, False),
                                 levels=(4, 3), norm_num_groups=4).eval()
    prep = preprocessing(image_keys=["t1"], spacing=(4.0, 4.0, 4.0), k_divisible=autoencoder.downsample_factor)
    (path,) = translate_volumes(model, autoencoder, MaskGiTSampler(num_steps=2), items, ["T1"], "T2", prep,
                                str(out), **kwargs)
    return nib.load(path).get_fdata()


@pytest.mark.parametrize("max_grid", [(32, 32, 32), (4, 3, 4)])  # the source's 8^3 grid whole, or centre-cropped
def test_a_certain_model_translates_to_its_one_code_exactly_as_its_samples_do(tmp_path, max_grid):
    """All mass on one token: the expected code is that token's code everywhere, so the expected-code translation
    is the sampled one, voxel for voxel (cells cropped away decode as the pad token in both)."""
    logits = torch.full((12,), -1e4)
    logits[7] = 0.0
    items = t1_volumes(tmp_path, 1)
    sampled = _translate(FixedLogits(logits, max_grid), items, tmp_path / "sampled", pad_token=2)
    expected = _translate(FixedLogits(logits, max_grid), items, tmp_path / "expected", pad_token=2,
                          expected_codes=True)
    np.testing.assert_allclose(expected, sampled, atol=1e-6)
    assert expected.std() > 0  # the case's brain, pad and background decode differently: not a constant volume


def test_an_uncertain_model_translates_to_one_volume_whatever_the_seed(tmp_path):
    """Mass spread over the codes: every sample differs, the expected-code translation is one volume for every seed,
    unlike any sample."""
    logits = torch.linspace(0, 2, 12)
    items = t1_volumes(tmp_path, 1)
    expected = [_translate(FixedLogits(logits), items, tmp_path / f"expected{seed}", seed=seed, expected_codes=True)
                for seed in (0, 5)]
    sampled = [_translate(FixedLogits(logits), items, tmp_path / f"sampled{seed}", seed=seed) for seed in (0, 5)]
    np.testing.assert_array_equal(expected[0], expected[1])
    assert np.abs(sampled[0] - sampled[1]).max() > 1e-3
    assert min(np.abs(expected[0] - s).max() for s in sampled) > 1e-3


def test_the_setting_is_read_as_true_or_false_and_a_word_is_refused(tmp_path):
    """``monai.bundle run --expected_codes false`` hands the config the string "false", which bool() calls true."""
    logits = torch.linspace(0, 2, 12)
    items = t1_volumes(tmp_path, 1)
    sampled = _translate(FixedLogits(logits), items, tmp_path / "sampled")
    as_word = _translate(FixedLogits(logits), items, tmp_path / "word", expected_codes="false")
    np.testing.assert_array_equal(as_word, sampled)
    with pytest.raises(ValueError, match="expected_codes must be true or false, got 'maybe'"):
        _translate(FixedLogits(logits), items, tmp_path / "maybe", expected_codes="maybe")
    assert not (tmp_path / "maybe").exists() or not any((tmp_path / "maybe").iterdir())  # nothing half-written
