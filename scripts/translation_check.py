#!/usr/bin/env python
"""Does a family's T1 -> T2 translation beat its trivial baselines, given more training than the demo's?

Runs the demo's stages (scripts/demo.py: the same commands, recipe flags and sheets) with every stage's epochs
multiplied by ``--scale``:

- ``maskgit``: FSQ autoencoder downsampling 2x instead of the demo's 4x (``MASKGIT_STAGE1``: tokens of 8 mm cubes, not
  16 mm) -> in-context transformer (the demo's maskgit_stage1 and maskgit_stage2_incontext), trained on crops of 12^3
  tokens and on the expected FSQ code's error too (``--code-weight 20``), translating whole volumes to the expected
  codes (``--expected-codes true``: the least squared error) instead of a sample;
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

    python scripts/translation_check.py maskgit --scale 3 --num-cases 80    # 53 min on 2 cores at 88 GFLOP/s a thread
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
# The MAISI ControlNet steered by the T1 volume alone; its test scores the translation against the source's maps. Every
# setting below was measured on the same cases; the tables are in the card (bundles/maisi_stage3_controlnet/docs,
# "Learning check"). A short training leaves the control pointing the right way but weak, by how much differs from
# run to run, so each run picks its conditioning scale by the whole validation split's PSNR. 2 Euler steps sample
# closer to the conditional mean, which PSNR rewards: they won validation over 10 steps by 0.22-0.24 dB in each of the
# last three runs that offered both.
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
    use_empty_mask=(),  # no mask here: the mask stage's difference row does not apply
    rows=(demo.Row("real T1 (source)", "{test[t1]}"),
          demo.Row("real T2", "{test[t2]}", crop_as="{test[t1]}"),
          demo.Row("translated T2", "{stage}/generated/{test[case]}_t1_T2.nii.gz")),  # on the model's grid
    title="MAISI stage 3, ControlNet on the T1 image: real T1 source (top), real T2 (middle), T2 translated (bottom)",
    scores=demo.TRANSLATION_SCORES,
    test=("--latent-cache-dir", "{maisi_stage1_vae}/latent_cache", *SAMPLING), choices=MAISI_SAMPLING,
    choose_by="psnr",
    epochs=150)  # 3000 steps per unit of scale (the mask stage's demo trains 500): 12000 at `--scale 4`, where 8000
# still gained 0.3 dB over 4000 and 12000 0.12 dB over 8000.
# The VAE and diffusion stages with 8 latent channels instead of the demo's 4 (each of their commands checks the
# checkpoint against it): with 4 the VAE's round trip of the test T2s (SSIM 0.870) was below the map's SSIM (0.877), so
# no translation through it could win; 8 cost about the same step time (only the layers next to the latent widen).
MAISI_LATENT = ("--latent-channels", "8")
# The VAE's KL term 100x lighter than the bundle's 1e-7: MAISI balanced 1e-7 x KL against an L1 reconstruction loss,
# and the demo's squared error is about 15x smaller, so 1e-7 x KL was a quarter of the loss and blurred the latent.
# 1e-7 -> 1e-9 took the T2 round trip from 24.2 to 26.3 dB and the translation from 21.19 (8000 steps) to 22.00 dB.
MAISI_VAE_KL = ("--loss#kl_weight", "1e-9")


# The FSQ autoencoder downsamples 2x instead of the demo's 4x (channels [16, 32]: one level less), with the demo's 4,375
# codes: a token stands for an 8 mm cube (2^3 voxels) instead of a 16 mm one (4^3), and the translation reads and
# writes at that grid. On 56 training pairs (`--num-cases 80`, 5 Dec) the 4x stage 1 capped it (T2 round trip 23.7 dB
# after 2700 steps, the map's own prediction encoded and decoded 1.3 dB below the map, the translation 19.45 dB / SSIM
# 0.774 against the map's 21.52 / 0.874); 2x after the same 2700 steps: test 29.8 dB / SSIM 0.970 over all modalities,
# T2 round trip 28.5 / 0.968, and 1080 in-context steps translated at 20.32 dB / 0.871; 2160 on a 1350-step stage 1
# (round trip 26.48) 20.93 / 0.8745; 3240 on the 2700-step one 21.93 / 0.903, past the map (21.52 / 0.874).
MASKGIT_STAGE1 = ("--network_def#num_channels", "[16, 32]", "--network_def#num_res_blocks", "[0, 1]",
                  "--network_def#attention_levels", "[false, false]")


def with_flags(stage: demo.Stage, flags: tuple[str, ...]) -> demo.Stage:
    """``stage`` with ``flags`` on its train, test and use commands (each checks the checkpoint against them)."""
    return replace(stage, train=stage.train + flags, test=stage.test + flags, use=stage.use + flags)


# 1080 in-context steps per unit of scale (the demo trains 80 to keep within its quarter of an hour), on crops of 12^3
# tokens (24^3 voxels; 26 x 30 x 22 tokens a whole volume: two modalities' sequence is 34k tokens, a step on it ~10x
# the crop's), translating whole volumes to the expected FSQ codes (the least squared error; at 4x a 12-step sample
# scored 1.4 dB lower) and trained on the expected code's squared error beside the cross-entropy (`--code-weight 20`:
# +0.35 dB at 4x). The measurements are in the card (bundles/maskgit_stage2_incontext/docs, "Measured on the CPU
# demo").
EXPECTED_CODES = ("--expected-codes", "true")
TOKEN_CROP = ("--roi-size", "24", "24", "24")  # after the demo's whole-volume window: the last flag given wins
MASKGIT_TRANSLATION = replace(ALL["maskgit_stage2_incontext"], epochs=54,
                              train=ALL["maskgit_stage2_incontext"].train + ("--code-weight", "20", *TOKEN_CROP),
                              test=ALL["maskgit_stage2_incontext"].test + EXPECTED_CODES,
                              use=ALL["maskgit_stage2_incontext"].use + EXPECTED_CODES)
FAMILIES = {"maskgit": (with_flags(ALL["maskgit_stage1"], MASKGIT_STAGE1), MASKGIT_TRANSLATION),
            "maisi": (with_flags(replace(ALL["maisi_stage1_vae"], train=ALL["maisi_stage1_vae"].train + MAISI_VAE_KL),
                                 MAISI_LATENT),
                      with_flags(ALL["maisi_stage2_diffusion"], MAISI_LATENT), MAISI_TRANSLATION)}
SPACING = 4.0  # mm: the demo's voxel size, at which the README's and the cards' checks ran
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
    context = demo.stage_context(out, {"data": resolve_dataset_dir(demo_cases=cases)}, SPACING)
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
                                SPACING, out / "sample_bound"))
    report = {"family": args.family, "scale": args.scale, "minutes": round((time.time() - started) / 60, 1),
              **{key: metrics.get(key) for key in REPORTED},
              "beats_baselines": all(score["passes"] for score in result["scores"]), "sheet": result["png"],
              **({"chosen_on_validation": result["chosen"]} if "chosen" in result else {})}
    print(json.dumps(report))
    return 0 if report["beats_baselines"] else 1


if __name__ == "__main__":
    demo.keep_freed_memory()
    sys.exit(main())
