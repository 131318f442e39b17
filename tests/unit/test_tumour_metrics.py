import math

import pytest
import torch
from ignite.engine import Engine

from prod9_components.metrics.tumour import (NanMean, SegDiceRatio, control_metrics, control_scores,
                                             control_sensitivity, segmentation_metrics, segmentation_scores,
                                             tumour_contrast)


def _case():
    seg = torch.zeros(8, 8, 8, dtype=torch.long)
    seg[2:4, 2:4, 2:4] = 2
    seg[2:3, 2:3, 2:3] = 3  # enhancing inside oedema; no necrosis
    brain = torch.zeros(8, 8, 8, dtype=torch.bool)
    brain[1:7, 1:7, 1:7] = True
    image = torch.full((8, 8, 8), 0.4)
    image[seg == 2], image[seg == 3] = 0.7, 0.9
    return image, seg, brain


def test_tumour_contrast_per_label():
    image, seg, brain = _case()
    contrast = tumour_contrast(image[None], seg, brain)
    assert math.isnan(contrast[1])  # absent label
    assert contrast[2] == pytest.approx(0.3) and contrast[3] == pytest.approx(0.5)


def test_control_sensitivity_inside_minus_outside():
    image, seg, brain = _case()
    changed = image.clone()
    changed[seg > 0] += 0.2
    changed[brain & (seg == 0)] += 0.05
    scores = control_sensitivity(changed, image, seg, brain)
    assert scores["inside"] == pytest.approx(0.2) and scores["outside"] == pytest.approx(0.05)
    assert scores["score"] == pytest.approx(0.15)
    assert control_sensitivity(image, image, seg, brain)["score"] == 0.0
    assert math.isnan(control_sensitivity(image, image, torch.zeros_like(seg), brain)["score"])


def test_control_scores_see_a_sample_washed_out_around_its_tumour():
    """The brain-shape scores of a mask-controlled sample: the real image itself scores Dice 1 and W1 0; a sample whose
    control saturated the whole volume (the tumour stands out no less) scores the Dice of the whole grid with the
    brain (216 of 512 voxels: 2 x 216 / 728) and the W1 of its intensities."""
    image, seg, brain = _case()
    real, seg = image.where(brain, torch.tensor(0.0))[None, None], seg[None]
    same = control_scores(real, real, real, seg)
    assert same["brain_dice"] == pytest.approx(1.0) and same["intensity_w1"] == pytest.approx(0.0, abs=1e-7)
    washed = torch.full_like(real, 0.8)
    washed[0, 0][seg[0] > 0] = 1.0
    scores = control_scores(washed, real, real, seg)
    assert scores["brain_dice"] == pytest.approx(2 * 216 / (512 + 216))
    # sorted, the 512 voxels pair as 296 background with 0.8, 208 brain (0.4) with 0.8, 7 + 1 tumour (0.7, 0.9) with 1
    assert scores["intensity_w1"] == pytest.approx((296 * 0.8 + 208 * 0.4 + 7 * 0.3 + 0.1) / 512, abs=0.005)
    assert scores["change_inside"] > 0.1  # the tumour changed too: these scores alone pass it


def test_nan_mean_skips_absent_labels_and_control_metrics_attach():
    outputs = [{"v": 1.0}, {"v": float("nan")}, {"v": 3.0}]
    engine = Engine(lambda e, batch: batch)
    NanMean(output_transform=lambda o: o["v"]).attach(engine, "v")
    for name, metric in control_metrics().items():
        metric.attach(engine, name)
    engine.run([{**o, **{k: 0.5 for k in control_metrics()}} for o in outputs])
    assert engine.state.metrics["v"] == 2.0 and engine.state.metrics["sensitivity"] == 0.5
    engine.run([{"v": float("nan"), **{k: float("nan") for k in control_metrics()}}])
    assert math.isnan(engine.state.metrics["v"])


def test_segmentation_scores_average_the_cases_with_a_tumour():
    image, seg, brain = _case()
    seg = torch.stack([seg, seg, torch.zeros_like(seg)])  # the third case has no tumour: no score
    perfect = (seg > 0)[:, None]
    empty = torch.zeros_like(perfect)
    scores = segmentation_scores(torch.stack([perfect[0], empty[1], perfect[2]]), perfect, seg)
    assert scores == {"seg_dice_generated": 0.5, "seg_dice_real": 1.0}  # (1 + 0) / 2; the tumourless case skipped
    nothing = segmentation_scores(empty[2:], empty[2:], seg[2:])
    assert math.isnan(nothing["seg_dice_generated"]) and math.isnan(nothing["seg_dice_real"])


def test_segmentation_scores_average_several_samples_of_the_same_cases():
    """Several draws per case (``segmentation_samples``): ``seg_dice_generated`` is the mean over every draw of every
    case with a tumour; one draw given as a tensor or as a one-item list scores the same."""
    image, seg, brain = _case()
    seg = torch.stack([seg, seg, torch.zeros_like(seg)])
    perfect = (seg > 0)[:, None]
    empty = torch.zeros_like(perfect)
    half = torch.stack([perfect[0], empty[1], perfect[2]])  # case 0 found, case 1 missed
    scores = segmentation_scores([perfect, empty, half], perfect, seg)
    assert scores["seg_dice_generated"] == pytest.approx((1 + 0 + 1 + 0 + 1 + 0) / 6)
    assert scores["seg_dice_real"] == 1.0  # the real image is segmented once
    assert segmentation_scores([half], perfect, seg) == segmentation_scores(half, perfect, seg)

def test_seg_dice_ratio_is_generated_over_real_of_the_epoch_means():
    engine = Engine(lambda e, batch: batch)
    for name, metric in segmentation_metrics().items():  # the ratio is attached last, after the means it reads
        metric.attach(engine, name)
    batches = [{"seg_dice_generated": 0.2, "seg_dice_real": 0.8}, {"seg_dice_generated": float("nan"),
                                                                    "seg_dice_real": float("nan")},
               {"seg_dice_generated": 0.4, "seg_dice_real": 0.6}]
    metrics = engine.run(batches).metrics
    assert metrics["seg_dice_generated"] == pytest.approx(0.3) and metrics["seg_dice_real"] == pytest.approx(0.7)
    assert metrics["seg_dice_ratio"] == pytest.approx(0.3 / 0.7)
    ratio = SegDiceRatio()
    assert math.isnan(ratio.ratio({"seg_dice_generated": 0.5, "seg_dice_real": 0.0}))  # no real tumour found
    assert math.isnan(ratio.ratio({"seg_dice_generated": 0.5}))
