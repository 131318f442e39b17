"""``prod9-train-maisi-controlnet``: MAISI stage 3, a ControlNet on the frozen stage-2 latent diffusion model
(bundle ``maisi_stage3_controlnet``).

Verbs: ``train``, ``validate``, ``test``, ``generate``, ``export``. Any ``--<bundle id> value`` not listed is passed
to the bundle as an override (e.g. ``--epochs 5``, ``--contrastive-weight 0.1``).
"""

from __future__ import annotations

from prod9_components.cli.argv import rename_deprecated_flags
from prod9_components.cli.bundle_runner import (evaluate_bundle, flag_overrides, main_for, path_list, report,
                                                 report_training, resolved, run_bundle)
from prod9_components.cli.written import start_clock, summary
from prod9_components.cli.zoo_export import export_stage

STAGE = "maisi_stage3_controlnet"



class MaisiControlNetCommands:
    """Train, evaluate and sample the MAISI ControlNet (MONAI bundle maisi_stage3_controlnet)."""

    def train(self, config: str | None = None, output_dir: str | None = None, diffusion_path: str | None = None,
              condition_type: str | None = None, source_modality: str | None = None, **overrides):
        """Train the ControlNet on the rectified-flow velocity loss; the stage-2 UNet stays frozen. Writes best.ckpt,
        last.ckpt and logs/ (latents come from the stage-2 latent cache, encoded once).

        Args:
            config: bundle directory, its train.json, or a preset layered on the bundle.
            output_dir: checkpoints and TensorBoard logs (default outputs/maisi_stage3).
            diffusion_path: the stage-2 best.ckpt (default outputs/maisi_stage2/best.ckpt); the VAE is the one it
                names.
            condition_type: what the ControlNet reads, inputs joined by '+' (README "Control types"): mask+label
                (tumour mask, default), image+label (a source modality: translation), mask+image+label, label
                (the target modality only); the MAISI ControlNet always reads the label.
            source_modality: the modality translated from, for image+label and mask+image+label (e.g. T1).
            overrides: any bundle id, e.g. --epochs 50 --contrastive-weight 0.1 --contrastive-margin 0.05.
                --tracking mlflow logs to <output_dir>/mlruns.db with data paths relative to the dataset
                directory (add --tracking-log-paths to log them absolute).
        """
        workflow = run_bundle(STAGE, "train", config, {
            "output_dir": output_dir, "diffusion_path": diffusion_path, "condition_type": condition_type,
            "source_modality": source_modality, **flag_overrides(overrides)})
        report_training(workflow)

    def validate(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
                 overwrite: bool = False, **overrides):
        """Evaluate on the validation split; writes <output_dir>/metrics_validation.json.

        Args:
            config: bundle directory or preset.
            checkpoint: best.ckpt of a stage-3 run (default <output_dir>/best.ckpt); everything is rebuilt from it.
            output_dir: run directory (default outputs/maisi_stage3).
            overwrite: replace an existing metrics_validation.json.
            overrides: any bundle id, e.g. --num-inference-steps 30, --conditioning-scale 4.
        """
        evaluate_bundle(STAGE, "validation", config, checkpoint, output_dir, {**overrides, "overwrite": overwrite})

    def test(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
             overwrite: bool = False, **overrides):
        """Evaluate on the held-out test split: velocity loss; with a source image PSNR/SSIM of the translation (whole
        brain and tumour) beside the VAE round trip and copy-the-source; with a mask the tumour contrast errors and
        control sensitivity (the keys MaskGiT stage 3 reports); writes <output_dir>/metrics_test.json.

        Args:
            config: bundle directory or preset.
            checkpoint: best.ckpt of a stage-3 run (default <output_dir>/best.ckpt).
            output_dir: run directory (default outputs/maisi_stage3).
            overwrite: replace an existing metrics_test.json.
            overrides: any bundle id.
        """
        evaluate_bundle(STAGE, "test", config, checkpoint, output_dir, {**overrides, "overwrite": overwrite})

    def generate(self, config: str | None = None, checkpoint: str | None = None, mask=None, source=None,
                 source_modality: str | None = None, modality: str | None = None, output: str | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 conditioning_scale: float | None = None, seed: int | None = None, output_dir: str | None = None,
                 overwrite: bool = False, **overrides):
        """Sample volumes steered by tumour masks and/or source images: <case>_<MOD>.nii.gz and the mask used,
        <case>_mask.nii.gz, on the model's grid (RAS, the VAE's spacing).

        Args:
            config: bundle directory or preset.
            checkpoint: best.ckpt of a stage-3 run (default <output_dir>/best.ckpt).
            mask: BraTS segmentation file(s), any label convention (4 -> 3); resampled onto the source's grid when
                theirs differ; default: every test-split case's mask (and source image).
            source: source image file(s) of --source-modality, one per mask, in the same order.
            source_modality: the modality of --source; must be the one the ControlNet was trained with.
            modality: the modality to generate (default: the first trained modality other than the source).
            output: output directory (default <output_dir>/generated).
            num_inference_steps: Euler steps (default 10; 1..1000).
            guidance_scale: classifier-free guidance of the modality label (default 1 = off).
            conditioning_scale: multiplies the ControlNet's effect on the base (default 1 = as trained; 0 = the base
                model alone; > 1 amplifies a control that training left weak: pick it on the validation split,
                e.g. `validate --conditioning-scale 4`).
            seed: sample i starts from the noise of seed + i (default 0).
            output_dir: run directory (default outputs/maisi_stage3).
            overwrite: replace volumes that already exist (a --mask or --source is never replaced).
            overrides: any bundle id, e.g. --roi-size 64 64 64: the sliding window that decodes the latent
                (default: the window recorded in the VAE export, 64 64 64).
        """
        start = start_clock()
        workflow = run_bundle(STAGE, "generate", config, {
            "checkpoint": checkpoint, "generate_dir": output, "mask": path_list(mask), "source": path_list(source),
            "source_modality": source_modality, "modality": modality, "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale, "conditioning_scale": conditioning_scale, "seed": seed,
            "output_dir": output_dir, "overwrite": overwrite,
            **flag_overrides(overrides)})
        report(summary("controlled samples", resolved(workflow, "generate_dir"), start))

    def export(self, output_dir: str, checkpoint: str = "outputs/maisi_stage3/best.ckpt"):
        """Write a trained ControlNet as a MONAI model-zoo bundle folder that runs on its own: configs/inference.json
        (standalone; in the folder `python -m monai.bundle run --config_file configs/inference.json` generates a
        volume per mask and/or source image into eval/), models/model.pt (the control branch), models/diffusion.pt
        (the frozen stage-2 UNet it controls), models/vae.pt (the stage-1 VAE), large_files.yml, docs/README.md
        (model card), docs/data_license.txt.

        Args:
            output_dir: the new bundle folder (must not exist, or be empty: nothing is replaced).
            checkpoint: best.ckpt of a stage-3 run (default outputs/maisi_stage3/best.ckpt).
        """
        export_stage(STAGE, checkpoint, output_dir)


def main(argv: list[str] | None = None) -> None:
    main_for(MaisiControlNetCommands, rename_deprecated_flags(argv), name_list_flags=("--mask", "--source"))


if __name__ == "__main__":
    main()
