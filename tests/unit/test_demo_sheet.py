"""The demo's PNG sheet: one row per volume, slices through the tumour where a row has a mask, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from tests.helpers import script_module


def _demo():
    return script_module("demo")


def _brain(shape=(20, 24, 16), seed=0) -> np.ndarray:
    """An ellipsoid of noisy tissue in [0, 1] on a zero background."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid**2).sum(axis=0) < 0.8
    return (inside * np.random.default_rng(seed).uniform(0.3, 1.0, shape)).astype(np.float32)


def test_centre_on_moves_the_chosen_voxel_to_where_the_mid_slices_cut():
    demo = _demo()
    volume = np.zeros((10, 12, 8), np.float32)
    volume[7, 3, 5] = 1.0
    window = demo.centre_on(volume, np.array([7, 3, 5]), (10, 12, 8))
    assert window.shape == (10, 12, 8)
    assert window[5, 6, 4] == 1.0 and window.sum() == 1.0  # the voxel moved to the middle
    np.testing.assert_array_equal(demo.centre_on(volume, np.array([5, 6, 4]), (10, 12, 8)), volume)  # already there
    mask = np.zeros((10, 12, 8), np.uint8)
    mask[6:9, 2:5, 4:7] = 2
    assert demo.slice_centre(volume, mask).tolist() == [7, 3, 5]  # the tumour's centre of mass
    assert demo.slice_centre(volume, None).tolist() == [5, 6, 4]  # no mask: the middle


def test_sheet_has_one_row_per_volume_and_draws_the_mask(tmp_path):
    demo = _demo()
    real, generated = _brain(seed=0), 0.5 * _brain(seed=1)
    mask = np.zeros(real.shape, np.uint8)
    mask[8:13, 14:19, 6:10] = 1
    png = tmp_path / "sheet.png"
    demo.write_sheet([("real", real, None, False), ("generated", generated, mask, False)], "real vs generated", png)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.png"]  # the temp file was renamed away
    image = imread(png)[..., :3]
    height, width, _ = image.shape
    assert 300 < height < width  # two rows of three views, wider than high
    red = (image[..., 0] > 0.8) & (image[..., 1] < 0.3) & (image[..., 2] < 0.3)
    rows = np.nonzero(red.any(axis=1))[0]
    assert red.sum() > 20 and rows.min() > height / 2  # the contour is drawn, and only on the masked (lower) row
    grey = image.mean(axis=2)
    top, bottom = grey[: height // 2], grey[height // 2:]
    assert top.mean() > bottom.mean() + 0.02  # the dimmer generated volume is the lower row


def test_a_difference_row_is_drawn_in_colour_brighter_and_darker_apart(tmp_path):
    """A signed row (a controlled sample minus the same seed's with an empty mask) is drawn over +-DIFFERENCE_RANGE
    in a diverging map: a brighter cube and a darker one get different hues, no change stays dark; the grey row
    above keeps its grey."""
    demo = _demo()
    real = _brain()
    difference = np.zeros(real.shape, np.float32)
    difference[4:9, 10:15, 6:10] = demo.DIFFERENCE_RANGE  # brighter, left of the axial slice's middle
    difference[12:17, 10:15, 6:10] = -demo.DIFFERENCE_RANGE  # darker, right of it
    png = tmp_path / "sheet.png"
    demo.write_sheet([("real", real, None, False), ("change", difference, None, True)], "difference", png)

    image = imread(png)[..., :3]
    height, width, _ = image.shape
    image = image[:, : int(0.85 * width)]  # the slices, without the colour bar on the right
    top, bottom = image[: height // 2], image[height // 2:]
    assert np.abs(top - top.mean(axis=2, keepdims=True)).max() < 0.02  # grey: equal channels
    reddish = (bottom[..., 0] > bottom[..., 2] + 0.3).sum()
    bluish = (bottom[..., 2] > bottom[..., 0] + 0.3).sum()
    assert reddish > 100 and bluish > 100  # both changes are drawn, in different hues
    dark = bottom.max(axis=2) < 0.15  # zero change: near black
    assert dark.mean() > 0.2


def test_a_difference_row_subtracts_the_intensities_as_written(tmp_path):
    """``Row(minus=...)`` loads both volumes on the model's grid without each one's own robust rescaling (which would
    map both brains' maxima to 1 and shift the difference) and returns image - minus; write_empty_mask writes an
    all-zero segmentation of the same grid and file name."""
    import nibabel as nib

    demo = _demo()
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    base = np.zeros((16, 16, 16), np.float32)
    base[3:13, 3:13, 3:13] = 0.5
    controlled = base.copy()
    controlled[6:9, 6:9, 6:9] = 0.6  # the change: +0.1 in a 3^3 cube
    paths = {}
    for name, volume in (("controlled", controlled), ("empty", base)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), paths[name])
    label, difference, mask, signed = demo.load_row(
        demo.Row("change", str(paths["controlled"]), minus=str(paths["empty"])), {"mm": "4.0"})
    assert label == "change" and mask is None and signed
    np.testing.assert_allclose(np.sort(difference.ravel())[-27:], 0.1, atol=1e-5)  # the cube, at its size
    assert np.abs(difference).sum() == pytest.approx(27 * 0.1, rel=1e-4)  # and nothing else
    grey = demo.load_row(demo.Row("controlled", str(paths["controlled"])), {"mm": "4.0"})
    assert not grey[3] and grey[1].max() == pytest.approx(1.0)  # a grey row is rescaled to [0, 1]

    seg = tmp_path / "case" / "BraTS2021_00001_seg.nii.gz"
    seg.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ones((5, 6, 7), np.uint8), affine), seg)
    empty = nib.load(demo.write_empty_mask(str(seg), tmp_path / "empty"))
    assert Path(empty.get_filename()).name == seg.name and empty.shape == (5, 6, 7)
    assert np.array_equal(empty.affine, affine) and not np.asarray(empty.dataobj).any()
    # A header that claims a huge grid is refused by name before anything is allocated or written.
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    huge = tmp_path / "huge_seg.nii"
    with open(huge, "wb") as file:
        header.write_to(file)
        file.write(b"\0" * 4)
    with pytest.raises(ValueError, match="huge_seg.nii: shape \\(30000, 30000, 30000\\) = 27,000,000,000,000 voxels"):
        demo.write_empty_mask(str(huge), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_stage_selection_keeps_pipeline_order():
    demo = _demo()

    def names(selection):
        return [s.name for s in demo.select_stages(selection)]

    assert names(["maisi"]) == ["maisi_stage1_vae", "maisi_stage2_diffusion", "maisi_stage3_controlnet"]
    assert names(["maskgit_stage3_controlnet", "maskgit_stage1"]) == ["maskgit_stage1", "maskgit_stage3_controlnet"]
    assert names(["maskgit_stage1,maisi_stage1_vae"]) == ["maskgit_stage1", "maisi_stage1_vae"]
    assert len(names(["all"])) == 7
    with pytest.raises(demo.DemoError, match="unknown stage 'maskgit_stage4'"):
        demo.select_stages(["maskgit_stage4"])


def test_every_stage_template_fills_and_reads_an_earlier_stage():
    demo = _demo()
    context = {**demo.stage_context(Path("o"), {"data": "d"}, demo.SPACING), "stage": "o/s",
               "test": {"case": "c", **{k: f"c_{k}.nii.gz" for k in ("t1", "t1ce", "t2", "flair", "seg")}}}
    order = [s.name for s in demo.STAGES]
    for stage in demo.STAGES:
        context = {**context, **(stage.choices[-1] if stage.choices else {})}  # test and use fill after the choice
        assert demo.train_command(stage, context)[:3] == ["train", "--config", demo.tiny_config(stage)]
        assert demo.test_command(stage, context)[:3] == ["test", "--config", demo.tiny_config(stage)]
        assert stage.scores, f"{stage.name} reports no score beside a baseline"
        assert Path(demo.tiny_config(stage)).is_file()
        demo.fill(stage.use, context)
        demo.fill(stage.use_empty_mask, {**context, "empty_mask": "e.nii.gz"})
        for row in stage.rows:
            demo.fill([t for t in (row.image, row.mask, row.crop_as, row.minus) if t], context)
            # a difference row subtracts the empty-mask sample, which only a stage with use_empty_mask writes
            assert row.minus is None or "generated_empty" in row.minus and stage.use_empty_mask
        assert stage.needs is None or order.index(stage.needs) < order.index(stage.name)


def test_generators_are_held_to_half_their_untrained_networks_intensity_w1(tmp_path, monkeypatch):
    """A generator stage trains a copy for one step at learning rate 0 (its own rate dropped) into <stage>/untrained,
    tests it like the trained one, and its W1 must be at most half that copy's."""
    import json

    demo = _demo()
    generators = [s for s in demo.STAGES if s.untrained]
    assert {s.name for s in generators} == {"maskgit_stage2_label", "maisi_stage2_diffusion"}
    context = demo.stage_context(tmp_path, {"data": "d"}, demo.SPACING)
    for stage in generators:
        folder = tmp_path / stage.name / "untrained"
        commands = []

        def run(stage_, args, folder=folder):  # what `train` and `test` leave in the untrained folder
            commands.append(args)
            if args[0] == "test":
                folder.mkdir(parents=True)
                (folder / "metrics_test.json").write_text(json.dumps({"intensity_w1": 0.12, "brain_dice": 0.45}))

        monkeypatch.setattr(demo, "run_command", run)
        scores = demo.untrained_scores(stage, {**context, "stage": context[stage.name]})
        assert scores == {"untrained_intensity_w1": 0.12, "untrained_brain_dice": 0.45}
        train, test = commands
        assert train[0] == "train" and test[0] == "test"
        for args in (train, test):
            assert args[args.index("--output-dir") + 1] == str(folder)
        assert [train[train.index(flag) + 1] for flag in ("--epochs", "--limit-train-batches")] == ["1", "1"]
        assert train.count("--learning-rate") == 1 and train[train.index("--learning-rate") + 1] == "0"
        assert test == demo.test_command(stage, {**context, "stage": str(folder)})
        w1 = next(s for s in stage.scores if s.baseline == "untrained_intensity_w1")
        assert w1.verdict({"intensity_w1": 0.059, **scores})["passes"]
        assert not w1.verdict({"intensity_w1": 0.061, **scores})["passes"]  # 0.5 x 0.12 = 0.06


def test_scores_are_reported_beside_their_baseline_and_a_loss_is_said_plainly():
    demo = _demo()
    psnr = demo.Score("psnr", "best_baseline_psnr", "pool")
    won = psnr.verdict({"psnr": 16.0, "best_baseline_psnr": 15.0})
    assert won["passes"] and won["margin"] == 1.0
    assert demo.score_line(won) == "psnr 16.000 vs 15.000 (pool): beats by 1.000"
    lost = psnr.verdict({"psnr": 12.9, "best_baseline_psnr": 14.6})
    assert not lost["passes"] and demo.score_line(lost).endswith("LOSES by 1.700")
    assert psnr.verdict({"psnr": 12.9}) is None  # no baseline in metrics_test.json: no row
    # Lower is better (a distance), and a fraction of the baseline as the bar (segment-the-synthetic).
    w1 = demo.Score("intensity_w1", "real_intensity_w1", "real", higher_is_better=False)
    assert w1.verdict({"intensity_w1": 0.05, "real_intensity_w1": 0.02})["passes"] is False
    dice = demo.Score("seg_dice_generated", "seg_dice_real", "real", need=0.5)
    assert dice.verdict({"seg_dice_generated": 0.3, "seg_dice_real": 0.5})["passes"] is True
    assert "vs 0.5 x 0.500" in demo.score_line(dice.verdict({"seg_dice_generated": 0.3, "seg_dice_real": 0.5}))
    # A margin over the baseline as the bar (stage 1 must clear pooling, not tie it).
    clear = demo.Score("psnr", "pool_baseline_psnr", "pool", plus=3.0)
    tied = clear.verdict({"psnr": 16.0, "pool_baseline_psnr": 15.0})
    assert not tied["passes"] and tied["margin"] == -2.0 and "vs 15.000 + 3 (pool)" in demo.score_line(tied)
    assert clear.verdict({"psnr": 18.5, "pool_baseline_psnr": 15.0})["passes"]
    # A fixed bar: no baseline key, the value against `plus` alone.
    bar = demo.Score("brain_dice", None, "fixed bar", plus=0.8)
    assert bar.verdict({"brain_dice": 0.82})["passes"] and not bar.verdict({"brain_dice": 0.78})["passes"]
    assert "vs 0.8 (fixed bar)" in demo.score_line(bar.verdict({"brain_dice": 0.78}))


def test_quality_table_keeps_losing_rows_and_caps_sheet_size(tmp_path):
    quality = script_module("quality")
    demo = _demo()
    scores = [demo.Score("psnr", "best_baseline_psnr", "pool").verdict({"psnr": 12.9, "best_baseline_psnr": 14.6}),
              demo.Score("ssim", "best_baseline_ssim", "pool").verdict({"ssim": 0.5, "best_baseline_ssim": 0.4}),
              demo.Score("psnr", "pool_baseline_psnr", "pool", plus=3).verdict({"psnr": 19, "pool_baseline_psnr": 15}),
              demo.Score("brain_dice", None, "fixed bar", plus=0.8).verdict({"brain_dice": 0.83})]
    summary = {"seconds": 600.0, "spacing_mm": 4.0, "stages": [
        {"stage": "maskgit_stage1", "train_seconds": 80.2, "steps": 120, "num_cases": 4, "scores": scores},
        {"stage": "maskgit_stage3_controlnet", "train_seconds": 50.0, "steps": 300, "num_cases": 32,
         "scores": scores[-1:], "conditioning_scale": 2},
        {"stage": "maisi_stage3_controlnet", "train_seconds": 40.0, "steps": 500, "num_cases": 32, "scores": []}],
        "machine": {"cpu": "test CPU", "cores": 2, "torch_threads": 2, "device": "cpu", "torch": "2.13.0"}}
    rows = quality.table_rows(summary)
    assert [(r["metric"], r["passes"]) for r in rows] == [("psnr", False), ("ssim", True), ("psnr", True),
                                                           ("brain_dice", True), ("brain_dice", True)]
    table = quality.markdown(summary, rows)
    assert "| maskgit_stage1 | 80 | 120 | 4 | psnr | 12.900 | pool | 14.600 | -1.700 | **loses** |" in table
    assert "| ssim | 0.500 | pool | 0.400 | +0.100 | beats |" in table
    assert "| psnr | 19.000 | pool | 15.000 + 3 | +1.000 | beats |" in table
    assert "| brain_dice | 0.830 | fixed bar | 0.8 | +0.030 | beats |" in table
    assert "| maskgit_stage3_controlnet | 50 | 300 | 32 | brain_dice |" in table
    # the scale each ControlNet's test ran with, as its run recorded it (a summary from before the record: said so)
    assert "at conditioning scale maskgit 2, maisi not recorded." in table
    assert "2 cores of test CPU, torch" in table  # a summary from before the matmul record
    summary["machine"]["matmul_gflops_per_thread"] = 34.6
    assert "2 cores of test CPU (float32 matmul 35 GFLOP/s a thread), torch" in quality.markdown(summary, rows)
    # A noisy full-colour sheet over 300 KB is re-encoded under the limit.
    from PIL import Image

    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > quality.MAX_PNG_BYTES
    quality.copy_sheet(big, tmp_path / "docs" / "big.png")
    assert (tmp_path / "docs" / "big.png").stat().st_size <= quality.MAX_PNG_BYTES



def test_quality_reads_only_a_demo_summary_and_says_in_one_line_what_is_wrong(tmp_path):
    quality = script_module("quality")
    score = _demo().Score("brain_dice", None, "fixed bar", plus=0.8).verdict({"brain_dice": 0.83})
    summary = {"seconds": 60.0, "spacing_mm": 4.0, "stages": [
        {"stage": "maisi_stage2_diffusion", "train_seconds": 5.0, "steps": 10, "num_cases": 8, "scores": [score],
         "png": "/elsewhere/README.md"}],  # a path the table does not follow: it copies <demo-dir>/<stage>.png
        "machine": {"cpu": "test CPU", "cores": 2, "torch_threads": 1, "device": "cpu", "torch": "2.13.0",
                    "matmul_gflops_per_thread": 86.2}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    read, rows, table = quality.read_summary(path)
    assert read == summary and [r["value"] for r in rows] == [0.83]
    assert "(float32 matmul 86 GFLOP/s a thread)" in table
    hostile = {"a speed that is not a number": {**summary, "machine": {**summary["machine"],
                                                                          "matmul_gflops_per_thread": "fast"}},
               "a stage the demo does not have": {**summary, "stages": [{**summary["stages"][0], "stage": "../x"}]},
               "stages that are not a list of records": {**summary, "stages": "all"},
               "no machine": {key: value for key, value in summary.items() if key != "machine"}}
    for what, bad in hostile.items():
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit) as exit_:
            quality.read_summary(path)
        message = str(exit_.value.code)
        assert message.startswith(f"quality: {path} is not a demo summary (") and "\n" not in message, what
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="is not a demo summary"):
        quality.read_summary(path)

def test_the_demo_layers_the_tiny_config_of_the_bundles_the_scripts_run(tmp_path, monkeypatch):
    """Beside a non-editable install the console scripts run the installed bundles and read any other config file as
    a user's preset (data): the repository's copy of tiny.json would leave its ``$`` export path a literal file name.
    The demo names the tiny.json of the bundles the scripts run, which they layer as config."""
    import shutil

    from prod9_components.cli import bundle_runner

    installed = tmp_path / "site-packages" / "prod9_components" / "bundles"
    shutil.copytree(bundle_runner.bundles_root(), installed)
    monkeypatch.setattr(bundle_runner, "bundles_root", lambda: installed)
    for stage in _demo().STAGES:
        config = _demo().tiny_config(stage)
        assert Path(config) == installed / stage.name / "configs" / "tiny.json"
        assert bundle_runner.user_preset(config) is None
        assert bundle_runner.config_files(stage.name, "train", config)[1][-1] == config
