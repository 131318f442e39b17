"""In-context ``generate --num-samples N``: the first N cases of several, or N samples of one source.

Real preprocessing, tokenizer, decoder, inversion and NIfTI writing on 16^3 volumes; only the transformer's sampler is
a stand-in that draws seeded random tokens (so two samples of one source differ exactly when their seeds do)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from prod9_components.data.transforms import preprocessing
from prod9_components.generation.maskgit import translate_volumes
from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ
from tests.helpers import t1_volumes


class RandomTokens:
    """A sampler stand-in: uniform random tokens from the generator it is given."""

    num_steps = 1

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size

    def sample(self, network, shape, *args, generator=None, **kwargs):
        return torch.randint(0, self.codebook_size, shape, generator=generator)


def _translate(items, out, **kwargs) -> list[str]:
    torch.manual_seed(0)
    autoencoder = AutoencoderFSQ(num_channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, False),
                                 norm_num_groups=4).eval()
    network = nn.Module()
    network.init_args = {"max_grid_size": [32, 32, 32]}
    prep = preprocessing(image_keys=["t1"], spacing=(4.0, 4.0, 4.0), k_divisible=autoencoder.downsample_factor)
    return translate_volumes(network, autoencoder, RandomTokens(autoencoder.codebook_size), items, ["T1"], "T2",
                             prep, str(out), **kwargs)


def test_first_n_cases_of_several(tmp_path):
    written = _translate(t1_volumes(tmp_path, 3), tmp_path / "out", num_samples=2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0_T2.nii.gz", "case1_T2.nii.gz"]
    assert [p.rsplit("/", 1)[1] for p in written] == ["case0_T2.nii.gz", "case1_T2.nii.gz"]
    with pytest.raises(ValueError, match="--num-samples 4: only 3 inputs to translate"):
        _translate(t1_volumes(tmp_path, 3), tmp_path / "more", num_samples=4)


def test_n_samples_of_one_source(tmp_path):
    (item,) = t1_volumes(tmp_path, 1)
    _translate([item], tmp_path / "out", num_samples=3)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"case0_sample_000{i}_T2.nii.gz" for i in (1, 2, 3)]
    images = [nib.load(tmp_path / "out" / n).get_fdata() for n in names]
    assert all(im.shape == (16, 16, 16) for im in images)  # back on the source's grid
    assert np.abs(images[0] - images[1]).max() > 0  # seeds seed + 0, seed + 1: different samples
    # Sample 1 of three is the one translation of the same source (seed + 0).
    _translate([item], tmp_path / "one")
    np.testing.assert_array_equal(nib.load(tmp_path / "one" / "case0_T2.nii.gz").get_fdata(), images[0])
    with pytest.raises(ValueError, match="--output names one file but there are 2 translations"):
        _translate([item], tmp_path, output_path=str(tmp_path / "x.nii.gz"), num_samples=2)
    with pytest.raises(ValueError, match="--num-samples must be >= 1, got 0"):
        _translate([item], tmp_path / "zero", num_samples=0)
