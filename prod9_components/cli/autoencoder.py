"""``prod9-train-autoencoder``: MaskGiT stage 1, the FSQ autoencoder (bundle ``maskgit_stage1``).

Verbs: ``train``, ``validate``, ``test``, ``infer``, ``export``. Any ``--<bundle id> value`` not listed is passed to the
bundle as an override (e.g. ``--epochs 5``, ``--network_def#num_channels '[32,64,128]'``).

The verbs are those of every stage-1 autoencoder bundle: :class:`StageOneCommands` holds them once, and each
command (this one, ``prod9-train-maisi-vae``) is a subclass that names its bundle, so ``--help`` shows that
bundle's defaults.
"""

from __future__ import annotations

import functools
import os

from prod9_components.cli.bundle_runner import (evaluate_bundle, flag_overrides, main_for, report,
                                                 report_training, resolved, run_bundle)
from prod9_components.cli.written import start_clock, summary
from prod9_components.cli.zoo_export import export_stage

STAGE = "maskgit_stage1"
VERBS = ("train", "validate", "test", "infer", "export")


def _with_doc(verb, doc: str):
    """``verb`` with another docstring; ``functools.wraps`` keeps the signature fire reads the flags from."""

    @functools.wraps(verb)
    def documented(self, *args, **kwargs):
        return verb(self, *args, **kwargs)

    documented.__doc__ = doc
    return documented


class StageOneCommands:
    """Train, evaluate and run the {title} (MONAI bundle ``{stage}``).

    A template: each subclass names its bundle (class keywords ``stage``, ``title``, ``output_dir``,
    ``export_path``), which fill in the fields in braces of these docstrings.
    """

    _stage: str  # names starting with "_": fire's help does not list them
    _output_dir: str

    def __init_subclass__(cls, *, stage: str, title: str, output_dir: str, export_path: str, **kwargs) -> None:
        """A command for one bundle: ``{stage}``, ``{title}``, ``{output_dir}`` and ``{export_path}`` in the
        docstrings below are filled in, so fire's ``--help`` states that bundle's defaults."""
        super().__init_subclass__(**kwargs)
        cls._stage, cls._output_dir = stage, output_dir
        fields = {"stage": stage, "title": title, "output_dir": output_dir, "export_path": export_path}
        cls.__doc__ = (cls.__doc__ or StageOneCommands.__doc__.splitlines()[0]).format(**fields)
        for name in VERBS:
            verb = getattr(cls, name)
            setattr(cls, name, _with_doc(verb, verb.__doc__.format(**fields)))

    def train(self, config: str | None = None, output_dir: str | None = None, **overrides):
        """Train on BRATS_DATA_DIR (or the demo dataset); writes best.ckpt, last.ckpt, logs/ and the export
        ({export_path}).

        Args:
            config: bundle directory, its train.json, or a preset JSON/YAML layered on the stage's bundle.
            output_dir: where checkpoints and TensorBoard logs go (default {output_dir}).
            overrides: any bundle id, e.g. --epochs 5 --batch-size 2 --roi-size 64 64 64 --dataset-dir DIR.
                --tracking mlflow logs to <output_dir>/mlruns.db with data paths relative to the dataset
                directory (add --tracking-log-paths to log them absolute).
        """
        workflow = run_bundle(self._stage, "train", config, {"output_dir": output_dir, **flag_overrides(overrides)})
        report_training(workflow, f", export {resolved(workflow, 'export_path')}")

    def validate(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
                 overwrite: bool = False, **overrides):
        """Evaluate a checkpoint on the validation split; writes <output_dir>/metrics_validation.json.

        Args:
            config: bundle directory, its train.json, or a preset layered on the stage's bundle.
            checkpoint: best.ckpt or an export (default <output_dir>/best.ckpt); the network is rebuilt from it.
            output_dir: run directory (default {output_dir}).
            overwrite: replace an existing metrics_validation.json.
            overrides: any bundle id (e.g. --limit-val-batches 4, --roi-size 64 64 64).
        """
        evaluate_bundle(self._stage, "validation", config, checkpoint, output_dir, {**overrides, "overwrite": overwrite})

    def test(self, config: str | None = None, checkpoint: str | None = None, output_dir: str | None = None,
             overwrite: bool = False, **overrides):
        """Evaluate a checkpoint on the held-out test split; writes <output_dir>/metrics_test.json.

        Args:
            config: bundle directory, its train.json, or a preset layered on the stage's bundle.
            checkpoint: best.ckpt or an export (default <output_dir>/best.ckpt).
            output_dir: run directory (default {output_dir}).
            overwrite: replace an existing metrics_test.json.
            overrides: any bundle id.
        """
        evaluate_bundle(self._stage, "test", config, checkpoint, output_dir, {**overrides, "overwrite": overwrite})

    def infer(self, input: str | None = None, output: str | None = None, config: str | None = None,
              checkpoint: str | None = None, roi_size=None, overlap: float | None = None,
              sw_batch_size: int | None = None, output_dir: str | None = None, overwrite: bool = False,
              **overrides):
        """Reconstruct a NIfTI volume through the sliding window; the output keeps the input's shape, affine and
        intensity range.

        Args:
            input: a NIfTI file (.nii or .nii.gz); default: every volume of the test split
                (<case>_<MOD>_recon.nii.gz in <output_dir>/reconstructions).
            output: the reconstruction to write (default <input name>_recon.nii.gz in <output_dir>/reconstructions);
                never the input itself.
            config: bundle directory, its train.json, or a preset layered on the stage's bundle.
            checkpoint: best.ckpt or an export (default <output_dir>/best.ckpt).
            roi_size: sliding-window size (default 64 64 64), e.g. --roi-size 96 96 96.
            overlap: window overlap in [0, 1) (default 0.5).
            sw_batch_size: windows per forward pass (default 4).
            output_dir: run directory (default {output_dir}).
            overwrite: replace reconstructions that already exist (the input is never replaced).
            overrides: any bundle id.
        """
        if input is not None and not os.path.isfile(input):
            raise FileNotFoundError(f"--input {input}: no such file")
        if output is not None and input is None:
            raise ValueError("--output needs --input (one input, one output file)")
        start = start_clock()
        workflow = run_bundle(self._stage, "infer", config, {
            "input": input, "output": output, "checkpoint": checkpoint, "roi_size": roi_size, "overlap": overlap,
            "sw_batch_size": sw_batch_size, "output_dir": output_dir, "overwrite": overwrite,
            **flag_overrides(overrides)})
        report(f"reconstruction written to {output}" if output else
               summary("reconstructions", resolved(workflow, "infer_dir"), start))

    def export(self, output_dir: str, checkpoint: str | None = None):
        """Write a trained checkpoint as a MONAI model-zoo bundle folder that runs on its own: configs/inference.json
        (standalone: reconstructs volumes with models/model.pt), models/model.pt, large_files.yml, docs/README.md
        (model card), docs/data_license.txt.

        Args:
            output_dir: the new bundle folder (must not exist, or be empty: nothing is replaced).
            checkpoint: best.ckpt or an export of this stage (default {output_dir}/best.ckpt).
        """
        export_stage(self._stage, checkpoint or os.path.join(self._output_dir, "best.ckpt"), output_dir)


class AutoencoderCommands(StageOneCommands, stage=STAGE, title="MaskGiT stage-1 FSQ autoencoder",
                          output_dir="outputs/maskgit_stage1", export_path="<output_dir>/brats_autoencoder-large.pt"):
    """Train, evaluate and run the {title} (MONAI bundle ``{stage}``)."""


def main(argv: list[str] | None = None) -> None:
    main_for(AutoencoderCommands, argv)


if __name__ == "__main__":
    main()
