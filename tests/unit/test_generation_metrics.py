"""Scores of generated volumes (prod9_components.metrics.generation) on tiny volumes whose answers are known."""

import pytest
import torch

from prod9_components.metrics.generation import (
    brain_mask,
    brain_shape_dice,
    dice,
    generation_scores,
    memorised,
    nearest_training_distance,
    pairwise_ms_ssim,
    real_reference,
)

SIZE = 32  # MS-SSIM needs every side >= 28


def box(start, stop, value: float = 0.8, background: float = 0.0) -> torch.Tensor:
    """(1, 32, 32, 32) volume: ``value`` in the box [start, stop) per axis, ``background`` elsewhere."""
    volume = torch.full((1, SIZE, SIZE, SIZE), background)
    volume[(0, *(slice(a, b) for a, b in zip(start, stop)))] = value
    return volume


def brain(seed: int, shift: int = 0) -> torch.Tensor:
    """A textured 'brain': a 16^3 block of tissue in [0.4, 1] (shifted by ``shift`` along the first axis) with a dark
    'ventricle' inside, on a background of exactly 0, like a preprocessed real volume."""
    generator = torch.Generator().manual_seed(seed)
    volume = box((8 + shift, 8, 8), (24 + shift, 24, 24), 0.0)
    volume[0, 8 + shift:24 + shift, 8:24, 8:24] = 0.4 + 0.6 * torch.rand(16, 16, 16, generator=generator)
    volume[0, 14 + shift:18 + shift, 14:18, 14:18] = 0.02
    return volume


def test_brain_mask_fills_holes_drops_specks_and_ignores_faint_background_noise():
    real = brain(0)
    expected = box((8, 8, 8), (24, 24, 24), 1.0).bool()  # the ventricle is inside the brain
    assert torch.equal(brain_mask(real), expected)
    # A generated volume: faint noise in the background (below 10% of the range) and a bright speck outside.
    generated = real + 0.05 * torch.rand(real.shape, generator=torch.Generator().manual_seed(1))
    generated[0, 1, 1, 1] = 0.9
    assert torch.equal(brain_mask(generated), expected)
    # Another intensity range: the threshold moves with it (-1 + 0.1 * 2 = -0.8).
    assert torch.equal(brain_mask(real * 2 - 1, (-1.0, 1.0)), expected)
    assert not brain_mask(torch.zeros(1, SIZE, SIZE, SIZE)).any()


def test_dice_of_known_shapes():
    cube = brain_mask(box((8, 8, 8), (24, 24, 24)))
    assert dice(cube, cube) == 1.0
    # Shifted by 4 voxels: overlap 12 x 16 x 16 of two 16^3 cubes -> 2 * 12 / (2 * 16) = 0.75.
    shifted = brain_mask(box((12, 8, 8), (28, 24, 24)))
    assert dice(cube, shifted) == pytest.approx(0.75)
    # Shrunk to the central 8^3: 2 * 512 / (4096 + 512) = 2/9.
    shrunk = brain_mask(box((12, 12, 12), (20, 20, 20)))
    assert dice(cube, shrunk) == pytest.approx(2 / 9)
    assert dice(cube, torch.zeros_like(cube)) == 0.0 and dice(torch.zeros_like(cube), torch.zeros_like(cube)) == 1.0
    # The brain-shape score is the Dice with the closest reference: a perfect shape scores 1.
    assert brain_shape_dice(shrunk, [cube, shifted]) == pytest.approx(2 / 9)
    assert brain_shape_dice(shifted, [cube, shrunk]) == pytest.approx(0.75)
    assert brain_shape_dice(cube, [shrunk, shifted, cube]) == 1.0


def test_ms_ssim_diversity_is_one_for_identical_volumes_and_lower_for_different_ones():
    a, b = brain(0), brain(1)
    assert pairwise_ms_ssim([a, a.clone(), a.clone()]) == pytest.approx(1.0, abs=1e-6)
    different = pairwise_ms_ssim([a, b])
    assert 0.0 < different < 0.999  # same block, other texture: only the finest scale sees the difference
    # The mean over the three pairs: (1 + different + different) / 3.
    assert pairwise_ms_ssim([a, a.clone(), b]) == pytest.approx((1 + 2 * different) / 3, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 volumes"):
        pairwise_ms_ssim([a])


def test_ms_ssim_diversity_is_the_same_scored_in_batches_of_any_size(monkeypatch):
    import prod9_components.metrics.generation as generation

    volumes = [brain(seed) for seed in range(4)]  # 6 pairs
    together = pairwise_ms_ssim(volumes)
    for pairs_per_batch in (1, 4):
        monkeypatch.setattr(generation, "PAIRS_VOXELS", pairs_per_batch * volumes[0].numel())
        assert pairwise_ms_ssim(volumes) == pytest.approx(together, abs=1e-6)


def test_a_copy_of_a_training_case_is_at_distance_zero_and_flagged():
    training = [brain(0), brain(1)]
    held_out = brain(2)
    copy = training[1].clone()
    assert nearest_training_distance(copy, training) == 0.0
    # A known distance: the first training case plus 0.1 inside a 16 x 32 x 32 slab = 0.1 * half the volume.
    offset = training[0].clone()
    offset[0, :16] += 0.1
    assert nearest_training_distance(offset, training) == pytest.approx(0.05, abs=1e-6)
    real = nearest_training_distance(held_out, training)
    # Independent textures in [0.4, 1] differ by 0.6 / 3 on average, in the brain (4032 of 32768 voxels).
    assert real == pytest.approx(0.2 * 4032 / SIZE**3, rel=0.1)
    # Flag: below half the held-out case's own distance.
    assert memorised([0.0, 0.4 * real, real, 0.6 * real], [real]) == [True, True, False, False]
    assert memorised([nearest_training_distance(copy, training), nearest_training_distance(held_out, training)],
                     [real]) == [True, False]
    assert memorised([0.0], [real, 2 * real]) == [True]  # the closest held-out case sets the bar


def test_generation_scores_against_the_real_reference():
    training = [brain(0), brain(1), brain(2, shift=4)]
    held_out = [brain(3), brain(4)]
    reference = real_reference(held_out, training)
    real_distance = nearest_training_distance(held_out[0], training)
    assert reference.scores["real_brain_dice"] == 1.0  # every held-out brain has the shape of a training brain
    assert reference.scores["real_nearest_training_distance"] == pytest.approx(
        (real_distance + nearest_training_distance(held_out[1], training)) / 2)
    assert 0.0 < reference.scores["real_ms_ssim"] < 0.95
    assert reference.scores["real_intensity_w1"] > 0.0

    # A copy of a training case and a new brain of another shape (shrunk to 8 x 16 x 16 of tissue).
    novel = brain(5)
    novel[0, 8:12] = 0.0
    novel[0, 20:24] = 0.0
    copy = training[0].clone()
    scores = generation_scores([copy, novel], reference)
    assert set(scores) == {"brain_dice", "real_brain_dice", "intensity_w1", "real_intensity_w1", "gradient_w1",
                           "real_gradient_w1", "sample_ms_ssim", "real_ms_ssim", "nearest_training_distance",
                           "real_nearest_training_distance", "memorised_fraction"}
    # The copy scores Dice 1; the shrunk one 2 * 8 / (8 + 16) = 2/3 against the unshifted 16^3 brains.
    assert scores["brain_dice"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert scores["nearest_training_distance"] == pytest.approx(nearest_training_distance(novel, training) / 2)
    assert scores["memorised_fraction"] == 0.5  # the copy only
    assert scores["sample_ms_ssim"] == pytest.approx(pairwise_ms_ssim([copy, novel]))
    assert {k: v for k, v in scores.items() if k.startswith("real_")} == reference.scores

    # Samples that are the held-out cases themselves: no intensity distance to them, the real brains' scores.
    same = generation_scores([h.clone() for h in held_out], reference)
    assert same["intensity_w1"] == 0.0 and same["gradient_w1"] == 0.0
    assert same["brain_dice"] == 1.0 and same["memorised_fraction"] == 0.0
    assert same["nearest_training_distance"] == pytest.approx(reference.scores["real_nearest_training_distance"])

    # Kept as float16 between evaluations: the same scores to float16 precision.
    stored = generation_scores([copy, novel], reference.to("cpu"))
    assert stored["nearest_training_distance"] == pytest.approx(scores["nearest_training_distance"], abs=1e-3)
    assert stored["memorised_fraction"] == 0.5 and stored["brain_dice"] == scores["brain_dice"]
    with pytest.raises(ValueError, match="must have the real volumes' shape"):
        generation_scores([torch.zeros(1, 28, 28, 28)] * 2, reference)
