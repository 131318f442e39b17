"""The generation path both families share: the seeded loop, the saver's names and refusals, the condition parser,
the step-count check and token decoding. Real files and a real (tiny) FSQ autoencoder; the sample functions draw
from the generator the loop hands them, so what each file holds is known."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from prod9_components.generation.decode import decode_tokens
from prod9_components.generation.inputs import condition_items, input_items
from prod9_components.generation.loop import generate, sample_items, seeded
from prod9_components.generation.saver import GeneratedVolume, VolumeSaver, case_names, sample_names, spacing_affine
from prod9_components.inference.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig
from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ
from prod9_components.sampling.steps import check_num_steps

SHAPE = (1, 6, 5, 4)


class Counting:
    """A sample function: a (1, 6, 5, 4) uniform volume from the loop's generator; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, item, generator: torch.Generator) -> GeneratedVolume:
        self.calls += 1
        return GeneratedVolume(torch.rand(SHAPE, generator=generator), spacing_affine((2.0, 2.0, 3.0)))


def _nifti(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_sample_i_is_seed_plus_i_whatever_the_count(tmp_path):
    written = generate(Counting(), sample_items(3), VolumeSaver(tmp_path, sample_names(3, "T2")), seed=7)
    assert [p.rsplit("/", 1)[1] for p in written] == ["sample_0001_T2.nii.gz", "sample_0002_T2.nii.gz",
                                                      "sample_0003_T2.nii.gz"]
    for i, path in enumerate(written):
        expected = torch.rand(SHAPE, generator=torch.Generator().manual_seed(7 + i))[0].numpy()
        np.testing.assert_array_equal(_nifti(path), expected)
        np.testing.assert_array_equal(nib.load(path).affine, np.diag([2.0, 2.0, 3.0, 1.0]))
    # The third of five is the third of three.
    five = [v.image for v in seeded(Counting(), sample_items(5), seed=7)]
    np.testing.assert_array_equal(_nifti(written[2]), five[2][0].numpy())
    assert sample_names(2) == ["sample_0001.nii.gz", "sample_0002.nii.gz"]
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        sample_items(0)
    # The largest seed torch takes for the last sample still works; past it, or not an integer: one line, nothing
    # sampled or written (torch's own error was "Overflow when unpacking long long").
    assert len(list(seeded(Counting(), sample_items(2), seed=2**64 - 2))) == 2
    for bad in (2**64 - 1, -1, 1.5, True, "3"):
        counting = Counting()
        with pytest.raises(ValueError) as error:
            generate(counting, sample_items(2), VolumeSaver(tmp_path / "bad", sample_names(2)), seed=bad)
        assert str(error.value) == f"seed must be an integer from 0 to 2**64 - 2 for 2 sample(s), got {bad!r}"
        assert counting.calls == 0 and not (tmp_path / "bad").exists()


def test_masks_are_written_beside_their_samples(tmp_path):
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    mask = MetaTensor(torch.tensor([0, 1, 2, 3]).repeat(30)[None].reshape(SHAPE), affine=torch.as_tensor(affine))

    def sample(item, generator):
        return GeneratedVolume(torch.rand(SHAPE, generator=generator), affine, mask + item["shift"])

    items = [{"case": "a", "shift": 0}, {"case": "b", "shift": 1}]
    saver = VolumeSaver(tmp_path, case_names(["a", "b"], "T1"), modality="T1", masks=True)
    written = generate(sample, items, saver)
    assert [p.rsplit("/", 1)[1] for p in written] == ["a_T1.nii.gz", "a_mask.nii.gz", "b_T1.nii.gz", "b_mask.nii.gz"]
    saved = nib.load(tmp_path / "b_mask.nii.gz")
    assert saved.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(saved.dataobj), mask[0].numpy() + 1)
    np.testing.assert_array_equal(nib.load(tmp_path / "a_T1.nii.gz").affine, affine)
    # --output: the exact file, its mask beside it.
    single = VolumeSaver(tmp_path / "unused", ["x_T1.nii.gz"], str(tmp_path / "mine_T1.nii.gz"), "T1", masks=True)
    assert single.paths == [tmp_path / "mine_T1.nii.gz"] and single.mask_paths == [tmp_path / "mine_mask.nii.gz"]


def test_every_output_is_refused_before_the_first_sample(tmp_path):
    (tmp_path / "sample_0002_T1.nii.gz").write_bytes(b"earlier")
    source = tmp_path / "case_T1.nii.gz"
    source.write_bytes(b"input")
    sample = Counting()
    with pytest.raises(FileExistsError, match="sample_0002_T1.nii.gz already exists: pass --overwrite"):
        generate(sample, sample_items(2), VolumeSaver(tmp_path, sample_names(2, "T1")))
    for overwrite in (False, True):  # an input is never replaced
        with pytest.raises(ValueError, match="is the input"):
            VolumeSaver(tmp_path, case_names(["case"], "T1"), inputs=[str(source)], overwrite=overwrite)
    with pytest.raises(ValueError, match="would be written outside"):
        VolumeSaver(tmp_path, case_names(["../up"], "T1"))
    with pytest.raises(ValueError, match="--output names one file but there are 2 masks"):
        VolumeSaver(tmp_path, case_names(["a", "b"], "T1"), str(tmp_path / "one.nii.gz"), what="masks")
    assert sample.calls == 0 and (tmp_path / "sample_0002_T1.nii.gz").read_bytes() == b"earlier"
    generate(sample, sample_items(2), VolumeSaver(tmp_path, sample_names(2, "T1"), overwrite=True))
    assert sample.calls == 2 and nib.load(tmp_path / "sample_0002_T1.nii.gz").shape == SHAPE[1:]


def test_condition_items_from_files_or_the_test_split(tmp_path):
    files = {}
    for name in ("c1_seg", "c2_seg", "c1_t1", "c2_t1"):
        files[name] = tmp_path / f"{name}.nii.gz"
        files[name].write_bytes(b"x")
    # Mask files (both families' default condition): one item per mask, named after it.
    assert condition_items(str(files["c1_seg"])) == [{"case": "c1_seg", "seg": str(files["c1_seg"])}]
    # Masks and sources pair in order.
    items = condition_items([files["c1_seg"], files["c2_seg"]], [files["c1_t1"], files["c2_t1"]], True, True, "T1")
    assert items == [{"case": "c1_seg", "seg": str(files["c1_seg"]), "source": str(files["c1_t1"])},
                     {"case": "c2_seg", "seg": str(files["c2_seg"]), "source": str(files["c2_t1"])}]
    # The test split: cases without a segmentation give no mask-controlled sample; by label only every case counts.
    split = [{"case": "c1", "seg": "s1", "t1": "i1"}, {"case": "c2", "t1": "i2"}]
    assert condition_items(split) == [{"case": "c1", "seg": "s1"}]
    assert condition_items(split, None, False, True, "T1") == [{"case": "c1", "source": "i1"},
                                                               {"case": "c2", "source": "i2"}]
    assert condition_items(split, None, False, False) == [{"case": "c1"}, {"case": "c2"}]
    with pytest.raises(ValueError, match="the test split has no cases to take them from"):
        condition_items([{"case": "c2", "t1": "i2"}])
    with pytest.raises(FileNotFoundError, match="missing.nii.gz: no such mask file"):
        condition_items(str(tmp_path / "missing.nii.gz"))
    with pytest.raises(ValueError, match="steered by --source too"):
        condition_items([files["c1_seg"]], None, True, True, "T1")
    with pytest.raises(ValueError, match="takes no --source"):
        condition_items([files["c1_seg"]], [files["c1_t1"]], True, False)
    with pytest.raises(ValueError, match="got 2 mask.* but 1 source image.*: pass them in pairs"):
        condition_items([files["c1_seg"], files["c2_seg"]], [files["c1_t1"]], True, True, "T1")
    # Translation: one file per source modality makes one item.
    assert input_items([files["c1_t1"], files["c2_t1"]], ["T1", "T2"]) == [{"t1": str(files["c1_t1"]),
                                                                            "t2": str(files["c2_t1"])}]


def test_one_step_check_for_both_samplers():
    assert check_num_steps(8) == 8 and check_num_steps(np.int64(3), 1000) == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
            check_num_steps(bad)
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in 1\.\.1000"):
            check_num_steps(bad, 1000)


def test_decode_tokens_of_the_tokens_is_the_quantized_reconstruction(one_thread):
    """DESIGN §4 trap 1: decoding the token indices equals decoding the quantized latent they were read from."""
    torch.manual_seed(0)
    autoencoder = AutoencoderFSQ(num_channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, False),
                                 norm_num_groups=4).eval()
    image = torch.rand(1, 1, 16, 16, 16)
    wrapper = AutoencoderInferenceWrapper(autoencoder, SlidingWindowConfig(roi_size=16))
    tokens = wrapper.quantize_stage_2_inputs(image)
    decoded = decode_tokens(autoencoder, tokens, SlidingWindowConfig(roi_size=16))
    assert decoded.shape == (1, 1, 16, 16, 16) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, wrapper.decode(wrapper.encode(image)), rtol=0, atol=1e-6)
