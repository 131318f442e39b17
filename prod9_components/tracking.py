"""MLflow experiment tracking for ``--tracking mlflow``: MONAI's default settings, fitted to prod9's bundles.

Kept from MONAI: a local SQLite store ``<output_dir>/mlruns.db`` (MLflow 3 dropped the plain-directory store;
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns.db`` browses it), rank 0 only, the executed config
written beside the checkpoints. Changed:

- the training loss is read as ``output['loss']``: MONAI's ``from_engine(['loss'], first=True)`` expects a
  decollated list of per-sample dicts, prod9's trainers output one dict per batch;
- the artifacts are named by file: MONAI joins the config path onto the *text* of ``output_dir``, which breaks
  when ``output_dir`` is a plain path (as in every prod9 bundle); a training run logs the executed config and
  ``datalist.json``, an evaluation run the executed config and ``metrics.json``, and closes its run;
- the experiment is named after the bundle directory (``maskgit_stage1`` ...), not ``monai_experiment``;
- data paths in the logged artifacts are relative to the dataset directory (case names, not absolute patient paths;
  see :mod:`prod9_components.handlers.mlflow_shareable`) unless the bundle id ``tracking_log_paths`` is true
  (``--tracking-log-paths``);
- artifacts go to ``<output_dir>/mlruns`` also when ``output_dir`` has a space or a ``$`` in its name.

The ``prod9-train-*`` commands apply these settings for ``--tracking mlflow``. For ``python -m monai.bundle run``,
write them to a file and pass the file: ``python -m prod9_components.tracking > mlflow.json`` (add ``--evaluate``
for evaluate.json) then ``--tracking mlflow.json``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys

from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

__all__ = ["mlflow_settings", "tracking_settings"]

# The config this run executed: patch_bundle_tracking has just written it as <output_dir>/config_<timestamp>.json.
EXECUTED_CONFIG = ("[os.path.join(@output_dir, f) for f in sorted(os.listdir(@output_dir)) "
                   "if f.startswith('config_') and f.endswith('.json')][-1:]")

SHAREABLE_HANDLER = "prod9_components.handlers.mlflow_shareable.ShareableMLFlowHandler"
# MONAI hands MLflow the local artifact folder as a URI, which MLflow does not decode: an output_dir with a space or a
# "$" got its artifacts in a sibling folder "run%20dir/". A plain path keeps them in <output_dir>/mlruns. (A remote
# store set by MLFLOW_TRACKING_URI or a non-SQLite tracking_uri decides for itself, as in MONAI.)
ARTIFACT_LOCATION = ("$os.path.join(os.path.abspath(@output_dir), 'mlruns') if str(@tracking_uri).startswith('sqlite:')"
                     " and not os.environ.get('MLFLOW_TRACKING_URI') else None")


def mlflow_settings(evaluation: bool = False) -> dict:
    """Settings for MONAI's ``tracking`` argument (see module docstring).

    Args:
        evaluation: for evaluate.json runs (``validate`` / ``test``): the evaluator logs the artifacts and closes
            the run. During training the trainer does both, after the last validation.
    """
    settings = copy.deepcopy(DEFAULT_MLFLOW_SETTINGS)
    configs = settings["configs"]
    configs["experiment_name"] = "$os.path.basename(os.path.normpath(@bundle_root))"
    configs["tracking_log_paths"] = False  # set only where the bundle or a flag does not
    for name in ("trainer", "validator", "evaluator"):
        configs[name].update(_target_=SHAREABLE_HANDLER, dataset_dir="@dataset_dir", log_paths="@tracking_log_paths",
                             artifact_location=ARTIFACT_LOCATION)
    configs["trainer"]["output_transform"] = "$lambda output: output['loss']"
    configs["trainer"]["artifacts"] = f"${EXECUTED_CONFIG} + [os.path.join(@output_dir, 'datalist.json')]"
    if evaluation:
        configs["validator"]["artifacts"] = f"${EXECUTED_CONFIG} + [@metrics_path]"
        configs["validator"]["close_on_complete"] = True
    return settings


def tracking_settings(tracking: str | None, evaluation: bool = False) -> str | dict | None:
    """What to hand MONAI's workflow for a ``--tracking`` value: prod9's settings for ``"mlflow"``, a settings file
    path or None unchanged.

    Raises:
        ModuleNotFoundError: ``"mlflow"`` without MLflow installed (before any data is loaded).
        ValueError: settings written on the command line (a dict): their expressions would run, and flag values are
            data; a settings file the user names is like a ``--config`` file.
    """
    if tracking is not None and not isinstance(tracking, str):
        raise ValueError(f"--tracking takes mlflow or a settings file path, got a {type(tracking).__name__}")
    if tracking != "mlflow":
        return tracking
    if importlib.util.find_spec("mlflow") is None:
        raise ModuleNotFoundError("--tracking mlflow needs MLflow: pip install mlflow "
                                  "(or: pip install -e '.[tracking]')")
    return mlflow_settings(evaluation)


if __name__ == "__main__":
    print(json.dumps(mlflow_settings(evaluation="--evaluate" in sys.argv[1:]), indent=2))
