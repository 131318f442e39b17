"""``prod9-train-autoencoder``: MaskGiT stage 1, the FSQ autoencoder (bundle ``maskgit_stage1``).

Verbs: ``train``, ``validate``, ``test``, ``infer``. Any ``--<bundle id> value`` not listed is passed to the bundle
as an override (e.g. ``--epochs 5``, ``--network_def#num_channels '[32,64,128]'``).
"""

from __future__ import annotations

import os

from prod9_components.cli.bundle_runner import evaluate_bundle, flag_overrides, main_for, report, resolved, run_bundle

STAGE = "maskgit_stage1"


class AutoencoderCommands:
    """Train, evaluate and run the MaskGiT stage-1 FSQ autoencoder (a MONAI bundle)."""

    def train(self, config: str | None = None, output_dir: str | None = None, **overrides):
        """Train on BRATS_DATA_DIR (or the demo dataset); writes best.ckpt, last.ckpt, logs/ and the export.

        Args:
            config: bundle directory, its train.json, or a preset JSON/YAML layered on the stage's bundle.
            output_dir: where checkpoints and TensorBoard logs go (default outputs/maskgit_stage1).
            overrides: any bundle id, e.g. --epochs 5 --batch-size 2 --roi-size 64 64 64 --dataset-dir DIR.
        """
        workflow = run_bundle(STAGE, "train", config, {"output_dir": output_dir, **flag_overrides(overrides)})
        out = resolved(workflow, "output_dir")
        report(f"trained: checkpoints in {out}/ (best.ckpt, last.ckpt), TensorBoard logs in {out}/logs, "
               f"export {resolved(workflow, 'export_path')}")

    def validate(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
                 **overrides):
        """Evaluate a checkpoint on the validation split; writes <output_dir>/metrics.json.

        Args:
            config: bundle directory, its train.json, or a preset layered on the stage's bundle.
            checkpoint: best.ckpt or an export (default <output_dir>/best.ckpt); the network is rebuilt from it.
            output_dir: run directory (default outputs/maskgit_stage1).
            overrides: any bundle id (e.g. --limit-val-batches 4, --roi-size 64 64 64).
        """
        evaluate_bundle(STAGE, "validation", config, checkpoint, output_dir, overrides)

    def test(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
             **overrides):
        """Evaluate a checkpoint on the held-out test split; writes <output_dir>/metrics.json.

        Args:
            config: bundle directory, its train.json, or a preset layered on the stage's bundle.
            checkpoint: best.ckpt or an export (default <output_dir>/best.ckpt).
            output_dir: run directory (default outputs/maskgit_stage1).
            overrides: any bundle id.
        """
        evaluate_bundle(STAGE, "test", config, checkpoint, output_dir, overrides)

    def infer(self, input: str | None = None, output: str | None = None, config: str | None = None,
              checkpoint: str | None = None, roi_size=None, overlap: float | None = None,
              sw_batch_size: int | None = None, output_dir: str | None = None, **overrides):
        """Reconstruct a NIfTI volume through the sliding window; the output keeps the input's shape, affine and
        intensity range.

        Args:
            input: a NIfTI file (.nii or .nii.gz); default: every volume of the test split.
            output: the reconstruction to write (default <input name>_recon.nii.gz in <output_dir>/reconstructions).
            config: bundle directory, its train.json, or a preset layered on the stage's bundle.
            checkpoint: best.ckpt or an export (default <output_dir>/best.ckpt).
            roi_size: sliding-window size, e.g. --roi-size 64 64 64.
            overlap: window overlap in [0, 1) (default 0.5).
            sw_batch_size: windows per forward pass (default 1).
            output_dir: run directory (default outputs/maskgit_stage1).
            overrides: any bundle id.
        """
        if input is not None and not os.path.isfile(input):
            raise FileNotFoundError(f"--input {input}: no such file")
        if output is not None and input is None:
            raise ValueError("--output needs --input (one input, one output file)")
        workflow = run_bundle(STAGE, "infer", config, {
            "input": input, "output": output, "checkpoint": checkpoint, "roi_size": roi_size, "overlap": overlap,
            "sw_batch_size": sw_batch_size, "output_dir": output_dir, **flag_overrides(overrides)})
        where = output or resolved(workflow, "infer_dir")
        report(f"reconstruction written to {where}")


def main(argv: list[str] | None = None) -> None:
    main_for(AutoencoderCommands, argv)


if __name__ == "__main__":
    main()
