"""``prod9-train-maskgit-controlnet``: MaskGiT stage 3, a ControlNet on the frozen stage-2 transformer
(bundle ``maskgit_stage3_controlnet``).

Verbs: ``train``, ``validate``, ``test``, ``generate``, ``export``. Any ``--<bundle id> value`` not listed is passed
to the bundle as an override (e.g. ``--epochs 5``, ``--num-control-blocks 6``).
"""

from __future__ import annotations

from pathlib import Path

from prod9_components.cli.argv import rename_deprecated_flags
from prod9_components.cli.bundle_runner import (evaluate_bundle, flag_overrides, main_for, path_list, report,
                                                 report_training, resolved, run_bundle)
from prod9_components.cli.written import start_clock, summary
from prod9_components.cli.zoo_export import export_stage

STAGE = "maskgit_stage3_controlnet"



class ControlNetCommands:
    """Train, evaluate and sample the MaskGiT ControlNet (a MONAI bundle)."""

    def train(self, config: str | None = None, output_dir: str | None = None, transformer_path: str | None = None,
              control_type: str | None = None, **overrides):
        """Train the control branch on masked-token cross-entropy; the stage-2 transformer stays frozen.

        Args:
            config: bundle directory, its train.json, or a preset layered on the bundle.
            output_dir: checkpoints and TensorBoard logs (default outputs/maskgit_stage3).
            transformer_path: the stage-2 best.ckpt (default outputs/maskgit_stage2_label/best.ckpt).
            control_type: what the control branch reads, inputs joined by '+' (README "Control types"): mask
                (tumour mask, default), label (modality) or mask+label.
            overrides: any bundle id, e.g. --epochs 5 --num-control-blocks 6 --roi-size 64 64 64.
                --tracking mlflow logs to <output_dir>/mlruns.db with data paths relative to the dataset
                directory (add --tracking-log-paths to log them absolute).
        """
        workflow = run_bundle(STAGE, "train", config, {"output_dir": output_dir, "transformer_path": transformer_path,
                                                       "control_type": control_type, **flag_overrides(overrides)})
        report_training(workflow)

    def validate(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
                 overwrite: bool = False, **overrides):
        """Evaluate on the validation split; writes <output_dir>/metrics_validation.json.

        Args:
            config: bundle directory or preset.
            checkpoint: best.ckpt of a stage-3 run (default <output_dir>/best.ckpt).
            output_dir: run directory (default outputs/maskgit_stage3).
            overwrite: replace an existing metrics_validation.json.
            overrides: any bundle id, e.g. --num-inference-steps 8, --conditioning-scale 4.
        """
        evaluate_bundle(STAGE, "validation", config, checkpoint, output_dir, {**overrides, "overwrite": overwrite})

    def test(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
             overwrite: bool = False, **overrides):
        """Evaluate on the held-out test split: masked-token loss and accuracy, tumour fidelity (tumour-vs-healthy
        contrast per label, generated vs real) and control sensitivity (the same seed with and without the mask);
        writes <output_dir>/metrics_test.json.

        Args:
            config: bundle directory or preset.
            checkpoint: best.ckpt of a stage-3 run (default <output_dir>/best.ckpt).
            output_dir: run directory (default outputs/maskgit_stage3).
            overwrite: replace an existing metrics_test.json.
            overrides: any bundle id.
        """
        evaluate_bundle(STAGE, "test", config, checkpoint, output_dir, {**overrides, "overwrite": overwrite})

    def generate(self, config: str | None = None, checkpoint: str | None = None, mask=None,
                 modality: str | None = None, output: str | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, conditioning_scale: float | None = None,
                 seed: int | None = None, output_dir: str | None = None, overwrite: bool = False, roi_size=None,
                 **overrides):
        """Sample volumes steered by tumour masks: <case>_<MOD>.nii.gz and the mask used, <case>_mask.nii.gz.

        Args:
            config: bundle directory or preset.
            checkpoint: best.ckpt of a stage-3 run (default <output_dir>/best.ckpt).
            mask: BraTS segmentation file(s), any label convention (4 -> 3) and grid (resampled nearest onto the
                model's grid); default: every test-split case's mask.
            modality: the modality to generate (T1, T1ce, T2, FLAIR; default T1).
            output: output directory (default <output_dir>/generated), or with one mask a .nii.gz file.
            num_inference_steps: MaskGiT decoding steps (default 12; --num-steps is a deprecated alias).
            guidance_scale: classifier-free guidance uncond + s * (cond - uncond) (default 1 = the conditional
                model, no guidance; > 1 strengthens the condition).
            conditioning_scale: multiplies the ControlNet's effect on the base (default 1 = as trained; 0 = the base
                model alone; > 1 amplifies a control that training left weak: pick it on the validation split,
                e.g. `validate --conditioning-scale 4`).
            seed: mask i is sampled with seed + i (default 0).
            output_dir: run directory (default outputs/maskgit_stage3).
            overwrite: replace volumes that already exist (a --mask is never replaced).
            roi_size: sliding-window size for decoding tokens to the image, e.g. --roi-size 64 64 64 (default: the
                window recorded in the stage-1 export, 64 64 64).
            overrides: any bundle id.
        """
        single_file = output is not None and str(output).endswith((".nii", ".nii.gz"))
        ids = {"checkpoint": checkpoint, "output_dir": output_dir, "num_inference_steps": num_inference_steps,
               "guidance_scale": guidance_scale, "conditioning_scale": conditioning_scale, "modality": modality,
               "seed": seed, "mask": path_list(mask),
               "output" if single_file else "generate_dir": output, "overwrite": overwrite,
               "sw_roi_size": roi_size, **flag_overrides(overrides)}
        start = start_clock()
        workflow = run_bundle(STAGE, "generate", config, ids)
        folder = resolved(workflow, "generate_dir") if not single_file else str(Path(output).parent)
        report(summary("mask-controlled samples", folder, start))

    def export(self, output_dir: str, checkpoint: str = "outputs/maskgit_stage3/best.ckpt"):
        """Write a trained ControlNet as a MONAI model-zoo bundle folder that runs on its own: configs/inference.json
        (standalone; in the folder `python -m monai.bundle run --config_file configs/inference.json` generates a
        volume per tumour mask into eval/), models/model.pt (the control branch), models/transformer.pt (the frozen
        stage-2 transformer it controls), models/autoencoder.pt (the stage-1 decoder), large_files.yml,
        docs/README.md (model card), docs/data_license.txt.

        Args:
            output_dir: the new bundle folder (must not exist, or be empty: nothing is replaced).
            checkpoint: best.ckpt of a stage-3 run (default outputs/maskgit_stage3/best.ckpt).
        """
        export_stage(STAGE, checkpoint, output_dir)


def main(argv: list[str] | None = None) -> None:
    main_for(ControlNetCommands, rename_deprecated_flags(argv), name_list_flags=("--mask",))


if __name__ == "__main__":
    main()
