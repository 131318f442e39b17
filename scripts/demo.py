#!/usr/bin/env python
"""The CPU demo: demo data -> train a tiny MaskGiT stage-1 autoencoder -> validate -> reconstruct -> PNG.

Runs the same commands a user types (``prod9-train-autoencoder ...``) on the embedded demo dataset (built from
nilearn's MNI152 anatomy on first use) and finishes in minutes on 2 CPU cores. Outputs go to ``outputs/demo/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "bundles" / "maskgit_stage1" / "configs" / "tiny.json"


def run(args: list[str]) -> None:
    print("$ " + " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/demo", help="where everything is written")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs of the tiny autoencoder")
    parser.add_argument("--batches", type=int, default=30, help="training batches per epoch")
    parser.add_argument("--spacing", type=float, default=2.0,
                        help="voxel size in mm (2 keeps the CPU demo fast; the bundles default to 1)")
    args = parser.parse_args()
    out = Path(args.output_dir)
    stage1 = out / "maskgit_stage1"
    bindir = Path(sys.executable).parent
    started = time.time()

    from prod9_components.data import resolve_dataset_dir

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    dataset_dir = resolve_dataset_dir()
    common = ["--config", str(TINY), "--output-dir", str(stage1)]
    spacing = ["--spacing", *[str(args.spacing)] * 3]
    # Validate twice (whole volumes through the sliding window are the slow part on a CPU).
    run([str(bindir / "prod9-train-autoencoder"), "train", *common, "--epochs", str(args.epochs),
         "--limit-train-batches", str(args.batches), "--val-interval", str(max(1, args.epochs // 2)),
         "--limit-val-batches", "1", "--dataset-dir", dataset_dir, *spacing])
    run([str(bindir / "prod9-train-autoencoder"), "test", *common, "--dataset-dir", dataset_dir])

    splits = json.loads((stage1 / "datalist.json").read_text())
    source = splits["test"][0]["t2"]
    recon = out / "reconstruction_t2.nii.gz"
    run([str(bindir / "prod9-train-autoencoder"), "infer", *common, "--input", source, "--output", str(recon),
         "--roi-size", "32", "32", "32", "--overlap", "0.5"])

    png = out / "input_vs_reconstruction.png"
    write_comparison_png(source, str(recon), png)
    metrics = json.loads((stage1 / "metrics.json").read_text())
    print(f"demo finished in {time.time() - started:.0f} s: model {stage1}/best.ckpt, TensorBoard logs "
          f"{stage1}/logs (tensorboard --logdir {stage1}/logs), reconstruction {recon}, comparison {png}; "
          f"test PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}")


def write_comparison_png(source: str, reconstruction: str, png: Path) -> None:
    """Axial/coronal/sagittal mid slices: input (top row) vs reconstruction (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np

    from prod9_components.handlers.tensorboard_images import mid_slice_grid

    volumes = [np.asarray(nib.as_closest_canonical(nib.load(p)).dataobj, dtype=np.float32) for p in
               (source, reconstruction)]
    high = float(np.percentile(volumes[0][volumes[0] > 0], 99.5))
    grid = mid_slice_grid(volumes, value_range=(0.0, high))
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.set_title("input (top) vs reconstruction (bottom): axial, coronal, sagittal")
    ax.axis("off")
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    os.replace(tmp, png)
    plt.close(fig)


if __name__ == "__main__":
    main()
