"""``prod9-train-transformer``: MaskGiT stage 2, the masked-token transformer.

Two bundles, one command: ``maskgit_stage2_label`` (label-conditional; ``--modality T1`` when generating) and
``maskgit_stage2_incontext`` (translation; ``--source-modality T1 [T1ce ...] --target-modality T2``). The bundle is
taken from ``--config`` when it names one, else from the checkpoint's stage, else from the flags.
Any other ``--<bundle id> value`` is passed to the bundle as an override.
"""

from __future__ import annotations

from pathlib import Path

from prod9_components.cli.argv import rename_deprecated_flags
from prod9_components.cli.bundle_runner import (evaluate_bundle, flag_overrides, main_for, report, report_training,
                                                 resolved, run_bundle)
from prod9_components.cli.literal_flags import Expression
from prod9_components.cli.seed_configs import seed_config
from prod9_components.cli.written import start_clock, summary
from prod9_components.cli.zoo_export import export_stage

LABEL, INCONTEXT = "maskgit_stage2_label", "maskgit_stage2_incontext"


def _as_list(value) -> list | None:
    if value is None:
        return None
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _stage(config: str | None, checkpoint: str | None, source_modality) -> str:
    """Which stage-2 bundle a command is about."""
    seed = seed_config(config)
    if seed is not None:  # the seed's configs/maskgit/brats/stage2/in_context.yaml etc.
        return seed.stage
    if config and Path(config).name in (LABEL, INCONTEXT):
        return Path(config).name
    if config and Path(config).parent.parent.name in (LABEL, INCONTEXT):  # .../<bundle>/configs/x.json
        return Path(config).parent.parent.name
    if checkpoint:
        from prod9_components.networks.export import load_record

        stage = load_record(checkpoint).get("stage")
        if stage not in (LABEL, INCONTEXT):
            raise ValueError(f"{checkpoint}: a '{stage}' checkpoint, not a stage-2 transformer "
                             f"({LABEL} or {INCONTEXT})")
        return stage
    return INCONTEXT if source_modality else LABEL


def _modalities(source_modality, target_modality) -> dict:
    overrides = {}
    if source_modality is not None:
        overrides["source_modalities"] = _as_list(source_modality)
    if target_modality is not None:
        overrides["target_modality"] = str(target_modality)
        overrides["target_modalities"] = [str(target_modality)]
    return overrides


class TransformerCommands:
    """Train, evaluate and sample the MaskGiT stage-2 transformer (MONAI bundles)."""

    def train(self, config: str | None = None, output_dir: str | None = None, source_modality=None,
              target_modality: str | None = None, **overrides):
        """Train on tokens of the stage-1 export (default outputs/maskgit_stage1/brats_autoencoder-large.pt).

        Args:
            config: bundle directory, its train.json, or a preset layered on the chosen bundle.
            output_dir: default outputs/maskgit_stage2_label or outputs/maskgit_stage2_incontext.
            source_modality: in-context mode: the context modalities, e.g. --source-modality T1 T1ce.
            target_modality: in-context mode: the modality to translate into, e.g. --target-modality T2.
            overrides: any bundle id, e.g. --autoencoder-path FILE --epochs 5 --roi-size 64 64 64.
                --tracking mlflow logs to <output_dir>/mlruns.db with data paths relative to the dataset
                directory (add --tracking-log-paths to log them absolute).
        """
        stage = _stage(config, None, source_modality)
        workflow = run_bundle(stage, "train", config, {"output_dir": output_dir,
                                                       **_modalities(source_modality, target_modality),
                                                       **flag_overrides(overrides)})
        report_training(workflow)

    def validate(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
                 overwrite: bool = False, **overrides):
        """Evaluate on the validation split; writes <output_dir>/metrics_validation.json.

        Args:
            config: bundle directory or preset.
            checkpoint: best.ckpt of a stage-2 run (its stage picks the bundle).
            output_dir: run directory.
            overwrite: replace an existing metrics_validation.json.
            overrides: any bundle id.
        """
        evaluate_bundle(_stage(config, checkpoint, None), "validation", config, checkpoint, output_dir,
                        {**overrides, "overwrite": overwrite})

    def test(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
             overwrite: bool = False, **overrides):
        """Evaluate on the held-out test split; writes <output_dir>/metrics_test.json (in-context: PSNR/SSIM of the
        translation, inside the brain and the tumour, beside the stage-1 round trip and the copy-the-source baseline).

        Args:
            config: bundle directory or preset.
            checkpoint: best.ckpt of a stage-2 run.
            output_dir: run directory.
            overwrite: replace an existing metrics_test.json.
            overrides: any bundle id.
        """
        evaluate_bundle(_stage(config, checkpoint, None), "test", config, checkpoint, output_dir,
                        {**overrides, "overwrite": overwrite})

    def generate(self, config: str | None = None, checkpoint: str | None = None, output: str | None = None,
                 num_samples: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, modality: str | None = None, source_modality=None,
                 target_modality: str | None = None, input=None, roi_size=None, sample_size=None,
                 seed: int | None = None, output_dir: str | None = None, overwrite: bool = False, **overrides):
        """Sample volumes: label mode writes sample_0001_<MOD>.nii.gz ...; in-context mode translates source
        volumes (--input, default the test split) into <case>_<TARGET>.nii.gz on each source's own grid
        (<case>_sample_0001_<TARGET>.nii.gz, ... for --num-samples N of one --input).

        Args:
            config: bundle directory or preset.
            checkpoint: best.ckpt of a stage-2 run (its stage picks the mode).
            output: output directory (or, with one --input, a .nii.gz file).
            num_samples: label mode: how many volumes (default 4); in-context: translate the first N test-split
                cases (default all), or N samples of one --input (default 1).
            num_inference_steps: MaskGiT decoding steps (default 12; --num-steps is a deprecated alias).
            guidance_scale: classifier-free guidance uncond + s * (cond - uncond) (default 1 = the conditional
                model, no guidance; > 1 strengthens the condition).
            modality: label mode: the modality to generate (T1, T1ce, T2, FLAIR).
            source_modality: in-context: source modalities (default: those it was trained on).
            target_modality: in-context: target modality (default: the trained one).
            input: in-context: source NIfTI file(s), one per source modality, in order.
            roi_size: sliding-window size for decoding tokens to the image, e.g. --roi-size 64 64 64 (default:
                the window recorded in the stage-1 export, 64 64 64; a multiple of its downsampling).
            sample_size: label mode: image size of each sample (default: the whole volume grid recorded in the
                checkpoint), e.g. 64 64 64, the centre of the training volume, a multiple of the stage-1 downsampling.
            seed: sample (or translation) i is drawn with seed + i (default 0).
            output_dir: run directory (default checkpoint location).
            overwrite: replace volumes that already exist (an --input is never replaced).
            overrides: any bundle id.
        """
        stage = _stage(config, checkpoint, source_modality)
        ids = {"checkpoint": checkpoint, "output_dir": output_dir, "num_inference_steps": num_inference_steps,
               "guidance_scale": guidance_scale, "overwrite": overwrite, "num_samples": num_samples, "seed": seed,
               "sw_roi_size": None if roi_size is None else _ints(roi_size), **flag_overrides(overrides)}
        single_file = output is not None and str(output).endswith((".nii", ".nii.gz"))
        ids["output" if single_file else "generate_dir"] = output
        if stage == LABEL:
            ids.update(modality=modality)
            if sample_size is not None:
                ids["token_grid"] = Expression(f"$[r // @downsample_factor for r in {list(_ints(sample_size))}]")
        else:
            if modality is not None:
                raise ValueError("--modality is for label-conditional checkpoints; use --target-modality")
            if sample_size is not None:  # a translation keeps its source's size
                raise ValueError("--sample-size is for label-conditional checkpoints; a translation has the size "
                                 "of its --input")
            ids.update(_modalities(source_modality, target_modality), input=_as_list(input))
        start = start_clock()
        workflow = run_bundle(stage, "generate", config, ids)
        report(f"generated volume written to {output}" if single_file else
               summary("generated volumes", resolved(workflow, "generate_dir"), start))

    def export(self, output_dir: str, checkpoint: str = "outputs/maskgit_stage2_label/best.ckpt"):
        """Write a trained transformer as a MONAI model-zoo bundle folder that runs on its own: configs/inference.json
        (standalone; in the folder `python -m monai.bundle run --config_file configs/inference.json` generates
        label-conditional samples, or translates the source volumes of an in-context checkpoint, into eval/),
        models/model.pt and models/autoencoder.pt (the stage-1 network it decodes with), large_files.yml,
        docs/README.md (model card), docs/data_license.txt.

        Args:
            output_dir: the new bundle folder (must not exist, or be empty: nothing is replaced).
            checkpoint: best.ckpt of a stage-2 run; its stage picks the bundle (default
                outputs/maskgit_stage2_label/best.ckpt; in-context: outputs/maskgit_stage2_incontext/best.ckpt).
        """
        export_stage(_stage(None, checkpoint, None), checkpoint, output_dir)


def _ints(value) -> list[int]:
    values = value if isinstance(value, (list, tuple)) else [value] * 3
    return [int(v) for v in values]


def main(argv: list[str] | None = None) -> None:
    main_for(TransformerCommands, rename_deprecated_flags(argv), name_list_flags=("--source-modality", "--input"))


if __name__ == "__main__":
    main()
