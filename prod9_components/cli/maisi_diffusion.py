"""``prod9-train-maisi-diffusion``: MAISI stage 2, rectified-flow latent diffusion (bundle ``maisi_stage2_diffusion``).

Verbs: ``train``, ``validate``, ``test``, ``generate``, ``export``. Any ``--<bundle id> value`` not listed is passed
to the bundle as an override (e.g. ``--epochs 5``, ``--vae-path outputs/maisi_stage1/maisi_vae_final.pt``).
"""

from __future__ import annotations

from prod9_components.cli.bundle_runner import (evaluate_bundle, flag_overrides, main_for, report, report_training,
                                                 resolved, run_bundle)
from prod9_components.cli.written import start_clock, summary
from prod9_components.cli.zoo_export import export_stage

STAGE = "maisi_stage2_diffusion"


class MaisiDiffusionCommands:
    """Train, evaluate and sample the MAISI rectified-flow latent diffusion model (MONAI bundle maisi_stage2_diffusion)."""

    def train(self, config: str | None = None, output_dir: str | None = None, vae_path: str | None = None,
              **overrides):
        """Cache the VAE latents of every case once, then train; writes best.ckpt (EMA weights), last.ckpt, logs/.

        Args:
            config: bundle directory, its train.json, or a preset JSON/YAML layered on the stage's bundle.
            output_dir: where checkpoints and TensorBoard logs go (default outputs/maisi_stage2).
            vae_path: the stage-1 VAE export (default outputs/maisi_stage1/maisi_vae_final.pt).
            overrides: any bundle id, e.g. --epochs 50 --batch-size 2 --latent-cache-dir DIR --dataset-dir DIR.
                --tracking mlflow logs to <output_dir>/mlruns.db with data paths relative to the dataset
                directory (add --tracking-log-paths to log them absolute).
        """
        workflow = run_bundle(STAGE, "train", config, {"output_dir": output_dir, "vae_path": vae_path,
                                                       **flag_overrides(overrides)})
        report_training(workflow)

    def validate(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
                 overwrite: bool = False, **overrides):
        """Velocity loss and sample-vs-real distances on the validation split; writes
        <output_dir>/metrics_validation.json.

        Args:
            config: bundle directory or preset.
            checkpoint: a best.ckpt of this stage (default <output_dir>/best.ckpt); the network is rebuilt from it.
            output_dir: run directory (default outputs/maisi_stage2).
            overwrite: replace an existing metrics_validation.json.
            overrides: any bundle id (e.g. --val-samples 4 --num-inference-steps 30).
        """
        evaluate_bundle(STAGE, "validation", config, checkpoint, output_dir, {**overrides, "overwrite": overwrite})

    def test(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
             overwrite: bool = False, **overrides):
        """As validate, on the held-out test split; writes <output_dir>/metrics_test.json.

        Args:
            config: bundle directory or preset.
            checkpoint: a best.ckpt of this stage (default <output_dir>/best.ckpt).
            output_dir: run directory (default outputs/maisi_stage2).
            overwrite: replace an existing metrics_test.json.
            overrides: any bundle id.
        """
        evaluate_bundle(STAGE, "test", config, checkpoint, output_dir, {**overrides, "overwrite": overwrite})

    def generate(self, config: str | None = None, checkpoint: str | None = None, output: str | None = None,
                 num_samples: int = 4, num_inference_steps: int | None = None, modality: str | None = None,
                 guidance_scale: float | None = None, seed: int | None = None, output_dir: str | None = None,
                 overwrite: bool = False, **overrides):
        """Sample volumes from noise: sample_0001.nii.gz, ... (sample_0001_T2.nii.gz with --modality), 1 mm RAS
        (the VAE's spacing), decoded through the sliding window.

        Args:
            config: bundle directory or preset.
            checkpoint: a best.ckpt of this stage (default <output_dir>/best.ckpt).
            output: output directory (default <output_dir>/generated).
            num_samples: how many volumes.
            num_inference_steps: Euler steps from noise to data (default 10; 1..1000).
            modality: T1, T1ce, T2 or FLAIR (default: unconditional, the null label).
            guidance_scale: classifier-free guidance (1 = the conditional model, 0 = unconditional; default 1).
            seed: sample i starts from the noise of seed + i (default 0).
            output_dir: run directory (default outputs/maisi_stage2).
            overwrite: replace samples that already exist.
            overrides: any bundle id, e.g. --roi-size 64 64 64: the sliding window that decodes the latent
                (default: the window recorded in the VAE export, 64 64 64).
        """
        start = start_clock()
        workflow = run_bundle(STAGE, "generate", config, {
            "checkpoint": checkpoint, "generate_dir": output, "num_samples": num_samples,
            "num_inference_steps": num_inference_steps, "modality": modality, "guidance_scale": guidance_scale,
            "seed": seed, "output_dir": output_dir, "overwrite": overwrite, **flag_overrides(overrides)})
        report(summary("generated volumes", resolved(workflow, "generate_dir"), start))

    def export(self, output_dir: str, checkpoint: str = "outputs/maisi_stage2/best.ckpt"):
        """Write a trained diffusion model as a MONAI model-zoo bundle folder that runs on its own:
        configs/inference.json (standalone; in the folder `python -m monai.bundle run --config_file
        configs/inference.json` generates samples from noise into eval/), models/model.pt (the EMA weights),
        models/vae.pt (the stage-1 VAE it decodes with), large_files.yml, docs/README.md (model card),
        docs/data_license.txt.

        Args:
            output_dir: the new bundle folder (must not exist, or be empty: nothing is replaced).
            checkpoint: a best.ckpt of this stage (default outputs/maisi_stage2/best.ckpt).
        """
        export_stage(STAGE, checkpoint, output_dir)


def main(argv: list[str] | None = None) -> None:
    main_for(MaisiDiffusionCommands, argv)


if __name__ == "__main__":
    main()
