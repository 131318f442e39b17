"""Segment-the-synthetic: the tumour segmenter, its Dice, and its fingerprinted cache, on tiny volumes where the
answer is known."""

from __future__ import annotations

import json
import logging
import math
import os
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from prod9_components.data.modalities import MODALITIES
from prod9_components.engines.tumour_segmenter import (CachedTumourSegmenter, TumourSegmenter, segmenter_input,
                                                        train_tumour_segmenter)
from prod9_components.metrics.tumour import tumour_dice

SHAPE = (24, 24, 24)
SPACING = (4.0, 4.0, 4.0)  # the files' own spacing: preprocessing keeps their grid
TINY = {"steps": 2, "roi_size": (32, 32, 32), "features": (4, 4, 8, 8, 16, 4)}


class BrightVoxels(nn.Module):
    """A 'segmenter' whose answer is known: tumour wherever the image channel is above 0.7."""

    def __init__(self) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] - self.threshold


def _blob_case(seed: int, shape=SHAPE) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A brain (sphere, intensities 0.3-0.5 with noise) holding a bright tumour blob (0.9) at a random place; every
    modality shows the blob. Returns (images by modality key, seg with core 1 inside oedema 2)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    centre = np.array(shape) / 2
    brain = np.linalg.norm(grid - centre, axis=-1) < min(shape) * 0.42
    tumour_centre = centre + rng.uniform(-4, 4, size=3)
    distance = np.linalg.norm(grid - tumour_centre, axis=-1)
    seg = np.where(distance < 4.0, 2, 0) + np.where(distance < 2.0, -1, 0)
    seg[~brain] = 0
    images = {}
    for i, key in enumerate(MODALITIES):
        image = np.where(brain, 0.3 + 0.05 * i + 0.03 * rng.standard_normal(shape), 0.0)
        image[seg > 0] = 0.9 + 0.02 * rng.standard_normal(int((seg > 0).sum()))
        images[key] = image.astype(np.float32)
    return images, seg.astype(np.uint8)


def _write_cases(root, names: list[str], seed: int = 0) -> list[dict]:
    affine = np.diag([*SPACING, 1.0])
    cases = []
    for n, name in enumerate(names):
        images, seg = _blob_case(seed + n)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        case = {"case": name}
        for key, volume in {**images, "seg": seg}.items():
            path = folder / f"{name}_{key}.nii.gz"
            nib.save(nib.Nifti1Image(volume, affine), str(path))
            case[key] = str(path)
        cases.append(case)
    return cases


def _volumes(seeds) -> list[dict]:
    """In-memory preprocessed-like volumes: ``{"image": (4, D, H, W), "seg": (1, D, H, W)}``."""
    out = []
    for seed in seeds:
        images, seg = _blob_case(seed)
        out.append({"image": torch.from_numpy(np.stack([images[k] for k in MODALITIES])),
                    "seg": torch.from_numpy(seg.astype(np.int64))[None]})
    return out


def test_dice_of_a_perfect_a_disjoint_and_a_half_prediction():
    seg = torch.zeros(3, 1, 8, 8, 8, dtype=torch.long)
    seg[:, :, 2:4, 2:4, 2:4] = 2
    seg[:, :, 2, 2, 2] = 3  # any label > 0 is the whole tumour
    pred = torch.zeros(3, 1, 8, 8, 8, dtype=torch.bool)
    pred[0] = seg[0] > 0  # perfect
    pred[1, :, 5:7, 5:7, 5:7] = True  # disjoint, the same size
    pred[2, :, 2:4, 2:4, 2:6] = True  # the tumour (8 voxels) and 8 more: 2 * 8 / (16 + 8)
    assert tumour_dice(pred, seg).tolist() == pytest.approx([1.0, 0.0, 2 / 3])
    assert math.isnan(float(tumour_dice(pred[:1], torch.zeros_like(seg[:1]))[0]))  # no tumour: no score


@pytest.mark.parametrize("shape", [(20, 12, 9), (40, 36, 33)])  # smaller than one window (padded); several windows
def test_segmenter_predicts_the_known_answer_through_the_sliding_window(shape):
    image = torch.full((2, 1, *shape), 0.3)
    seg = torch.zeros(2, *shape, dtype=torch.long)
    seg[:, 3:8, 4:9, 2:7] = 1
    image[seg[:, None] > 0] = 0.9
    segmenter = TumourSegmenter(BrightVoxels(), roi_size=(16, 16, 16), intensity_range=(-1.0, 1.0))
    predicted = segmenter.predict(image, [0, 3])
    assert predicted.shape == (2, 1, *shape) and predicted.dtype == torch.bool
    assert torch.equal(predicted[:, 0], seg > 0)
    assert segmenter.dice(image, [0, 3], seg).tolist() == [1.0, 1.0]
    moved = torch.roll(seg, shifts=10, dims=1)  # the conditioning mask somewhere the image has no tumour
    assert segmenter.dice(image, [0, 3], moved).tolist() == [0.0, 0.0]


def test_segmenter_input_appends_the_modality_one_hot():
    x = segmenter_input(torch.rand(2, 1, 4, 5, 6), torch.tensor([1, 3]))
    assert x.shape == (2, 5, 4, 5, 6)
    assert x[0, 1:].flatten(1).mean(1).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert x[1, 1:].flatten(1).mean(1).tolist() == [0.0, 0.0, 0.0, 1.0]


def test_a_few_steps_on_bright_blobs_beat_an_empty_prediction(one_thread):
    state = torch.get_rng_state()
    network, loss = train_tumour_segmenter(_volumes(range(4)), steps=20, roi_size=(32, 32, 32),
                                           features=(4, 4, 8, 8, 16, 4), learning_rate=3e-2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    held_out = _volumes([10, 11])
    segmenter = TumourSegmenter(network, roi_size=(32, 32, 32))
    images = torch.stack([v["image"][m : m + 1] for v in held_out for m in (0, 2)])
    seg = torch.stack([v["seg"] for v in held_out for _ in (0, 2)])
    dice = segmenter.dice(images, [0, 2, 0, 2], seg)
    empty = tumour_dice(torch.zeros_like(seg, dtype=torch.bool), seg)
    assert empty.tolist() == [0.0] * 4
    assert dice.min() > 0.5, dice
    assert math.isfinite(loss)


def _segmenter(tmp_path, cases, **settings) -> CachedTumourSegmenter:
    return CachedTumourSegmenter(tmp_path / "cache", cases[:2], cases[2:], SPACING, (0.0, 1.0),
                                 **{**TINY, **settings})


def test_the_cache_is_reused_when_nothing_changed_and_rebuilt_when_a_case_file_changes(tmp_path, caplog, one_thread):
    cases = _write_cases(tmp_path / "data", ["a", "b", "c"])
    caplog.set_level(logging.INFO, logger="prod9")
    first = _segmenter(tmp_path, cases)
    built = first.get()
    assert [r.message.split(" (")[0] for r in caplog.records if "tumour segmenter" in r.message][0].startswith(
        "tumour segmenter: training BasicUNet")
    files = sorted(p.name for p in first.folder.iterdir())
    assert files == ["metrics.json", "segmenter.json", "segmenter.pt"]
    metrics = json.loads((first.folder / "metrics.json").read_text())
    assert metrics["num_test_volumes"] == 4 and 0.0 <= metrics["dice_test"] <= 1.0  # 1 test case x 4 modalities
    assert json.loads((first.folder / "segmenter.json").read_text())["fingerprint"] == first.folder.name

    caplog.clear()
    again = _segmenter(tmp_path, cases)
    assert again.folder == first.folder
    reused = again.get()
    assert [r.message for r in caplog.records if "tumour segmenter" in r.message][0].startswith(
        f"tumour segmenter: reusing {first.folder}")
    for name, value in built.network.state_dict().items():
        assert torch.equal(reused.network.state_dict()[name], value), name
    for segmenter in (built, reused):  # oneDNN's faster layout on CPU, trained or loaded
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d)
                   for m in segmenter.network.modules() if isinstance(m, torch.nn.Conv3d))
    assert reused.metrics["dice_test"] == pytest.approx(metrics["dice_test"])

    other_settings = _segmenter(tmp_path, cases, steps=3)
    assert other_settings.folder != first.folder  # a training setting is part of the key

    stat = os.stat(cases[0]["t2"])  # the same bytes, a new mtime: the file may have changed, so rebuild
    os.utime(cases[0]["t2"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    caplog.clear()
    changed = _segmenter(tmp_path, cases)
    assert changed.folder != first.folder and not changed.folder.exists()
    changed.get()
    assert any(r.message.startswith("tumour segmenter: training") for r in caplog.records)
    assert (changed.folder / "segmenter.json").is_file() and (first.folder / "segmenter.json").is_file()


def test_runs_sharing_the_cache_train_it_once(tmp_path, caplog, one_thread):
    """Two runs that want the same segmenter at the same time (the demo's two ControlNets side by side; here two
    threads, each with its own lock file descriptor, as two processes have): one trains it, the other waits on the
    cache's lock and then reuses it."""
    cases = _write_cases(tmp_path / "data", ["a", "b", "c"])
    caplog.set_level(logging.INFO, logger="prod9")
    runs = [_segmenter(tmp_path, cases), _segmenter(tmp_path, cases)]
    got = [None, None]

    def get(i: int) -> None:
        got[i] = runs[i].get()

    threads = [threading.Thread(target=get, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    messages = [r.message for r in caplog.records if r.message.startswith("tumour segmenter: ")]
    assert sum(m.startswith("tumour segmenter: training") for m in messages) == 1, messages
    assert sum(m.startswith(f"tumour segmenter: reusing {runs[0].folder}") for m in messages) == 1, messages
    for name, value in got[0].network.state_dict().items():
        assert torch.equal(got[1].network.state_dict()[name], value), name
    assert (tmp_path / "cache" / f"{runs[0].folder.name}.lock").is_file()  # kept: see atomic.exclusive


def test_a_damaged_cache_is_trained_again_not_trusted(tmp_path, caplog, one_thread):
    cases = _write_cases(tmp_path / "data", ["a", "b", "c"])
    first = _segmenter(tmp_path, cases)
    first.get()
    (first.folder / "segmenter.pt").write_bytes(b"not a torch file")
    caplog.set_level(logging.INFO, logger="prod9")
    caplog.clear()  # only this run's lines (another test may have left the logger at INFO for the first one)
    again = _segmenter(tmp_path, cases)
    again.get()
    messages = [r.message for r in caplog.records if "tumour segmenter" in r.message]
    assert "cannot reuse it" in messages[0] and messages[1].startswith("tumour segmenter: training")
    assert torch.load(first.folder / "segmenter.pt", weights_only=True)["format"] == "prod9-tumour-segmenter"


def test_bad_settings_are_refused(tmp_path):
    case = {"case": "x", **{k: "unused" for k in MODALITIES}}  # no seg
    with pytest.raises(ValueError, match="needs training cases with a tumour mask"):
        CachedTumourSegmenter(tmp_path, [case], [], SPACING)
    with pytest.raises(ValueError, match="roi_size must be 3 multiples of 16, each >= 32"):
        CachedTumourSegmenter(tmp_path, [{**case, "seg": "unused"}], [], SPACING, roi_size=(16, 32, 32))
