"""The ``export`` verb of every ``prod9-train-*`` command: a trained stage as a MONAI model-zoo bundle folder that runs
on its own (:mod:`prod9_components.zoo`)."""

from __future__ import annotations

from prod9_components.cli.bundle_runner import bundles_root, report


def export_stage(stage: str, checkpoint: str, output_dir: str) -> None:
    """Write the zoo folder of ``checkpoint`` (a ``stage`` record) into ``output_dir`` and say where."""
    from prod9_components.zoo import export_bundle

    target = export_bundle(checkpoint, output_dir, stage, bundles_root() / stage)
    report(f"model-zoo bundle written to {target}/ (run it there: python -m monai.bundle run "
           "--config_file configs/inference.json; fill in the URLs in large_files.yml before publishing)")
