#!/usr/bin/env python
"""Does a family's T1 -> T2 translation beat its trivial baselines, given more training than the demo's?

Runs the demo's stages (scripts/demo.py: the same commands, recipe flags and sheets) with every stage's epochs
multiplied by ``--scale``:

- ``maskgit``: FSQ autoencoder -> in-context transformer (the demo's maskgit_stage1 and maskgit_stage2_incontext);
- ``maisi``: KL-VAE -> latent diffusion -> the demo's ControlNet stage conditioned on the source image instead of the
  tumour mask (``--condition-type image+label --source-modality T1``).

The last stage is tested on the whole test split. Prints one JSON line: the translation's PSNR / SSIM (brain and
tumour) beside the best of its baselines per score (copy, histogram-matched or intensity regression of the source)
and the stage-1 round trip of the target (the bound a translation through stage 1 cannot pass); exits 1 unless the
translation beats every baseline. Sheets, runs and metrics land in ``--output-dir``.

    python scripts/translation_check.py maskgit --scale 3    # 18 min on 2 cores
    python scripts/translation_check.py maisi                # about 6.5 min

Each stage's folder is replaced by a fresh run (as in the demo).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import demo

ALL = {stage.name: stage for stage in demo.STAGES}
# The MAISI ControlNet steered by the T1 volume alone; its test scores the translation against the source's maps.
MAISI_TRANSLATION = replace(
    ALL["maisi_stage3_controlnet"],
    train=("--diffusion-path", "{maisi_stage2_diffusion}/best.ckpt", "--condition-type", "image+label",
           "--source-modality", "T1", "--modalities", "['T2']",
           "--latent-cache-dir", "{maisi_stage1_vae}/latent_cache"),
    use=("generate", "--checkpoint", "{stage}/best.ckpt", "--source", "{test[t1]}", "--source-modality", "T1",
         "--modality", "T2", *demo.FLOW_STEPS, "--output", "{stage}/generated"),
    rows=(demo.Row("real T1 (source)", "{test[t1]}"),
          demo.Row("real T2", "{test[t2]}", crop_as="{test[t1]}"),
          demo.Row("translated T2", "{stage}/generated/{test[case]}_t1_T2.nii.gz")),  # on the model's grid
    title="MAISI stage 3, ControlNet on the T1 image: real T1 source (top), real T2 (middle), T2 translated (bottom)",
    scores=demo.TRANSLATION_SCORES,
    test=("--latent-cache-dir", "{maisi_stage1_vae}/latent_cache", *demo.FLOW_STEPS))
FAMILIES = {"maskgit": (ALL["maskgit_stage1"], ALL["maskgit_stage2_incontext"]),
            "maisi": (ALL["maisi_stage1_vae"], ALL["maisi_stage2_diffusion"], MAISI_TRANSLATION)}
REPORTED = ("psnr", "best_baseline_psnr", "ssim", "best_baseline_ssim", "psnr_tumour", "best_baseline_psnr_tumour",
            "ssim_tumour", "best_baseline_ssim_tumour", "roundtrip_psnr", "regression_source_psnr", "copy_source_psnr",
            "num_cases")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--scale", type=int, default=1, help="every stage's demo epochs times this (default 1)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the runs go (default outputs/translation_check/<family>_x<scale>)")
    args = parser.parse_args()
    if args.scale < 1:
        parser.error(f"--scale {args.scale}: must be at least 1")
    out = args.output_dir or Path("outputs") / "translation_check" / f"{args.family}_x{args.scale}"
    context = {"out": str(out), "data": demo.dataset_dir(), "mm": "4.0",
               **{name: str(out / name) for name in ALL}}
    started = time.time()
    for stage in FAMILIES[args.family]:
        try:
            result = demo.run_stage(replace(stage, epochs=stage.epochs * args.scale), context)
        except demo.DemoError as error:
            sys.exit(f"translation check failed at {stage.name}: {error}")
        except Exception as error:  # the check's own steps (sheet, metrics): one line, as in the demo
            sys.exit(f"translation check failed at {stage.name}: {type(error).__name__}: {error}")
    metrics = json.loads((out / FAMILIES[args.family][-1].name / "metrics_test.json").read_text())
    report = {"family": args.family, "scale": args.scale, "minutes": round((time.time() - started) / 60, 1),
              **{key: metrics.get(key) for key in REPORTED},
              "beats_baselines": all(score["passes"] for score in result["scores"]), "sheet": result["png"]}
    print(json.dumps(report))
    return 0 if report["beats_baselines"] else 1


if __name__ == "__main__":
    sys.exit(main())
