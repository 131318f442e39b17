"""MONAI's ``MLFlowHandler`` that logs data paths relative to the dataset directory, not as absolute paths.

A tracking store is made to be shared (a team server, a copied ``mlruns.db``), and absolute paths of patient volumes
(``/hospital/study/PATIENT_ID/t1.nii.gz``) say more than the run needs. So, unless ``log_paths`` is set, every JSON
artifact (the executed config, ``datalist.json``, ``metrics.json``) is logged as a copy in which each absolute path
under the dataset directory becomes relative to it (``BraTS2021_00000/BraTS2021_00000_t1.nii.gz``), the dataset
directory itself becomes its name, and any other absolute path its file name. The files in the run directory keep
their absolute paths; non-JSON artifacts are logged as they are.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from monai.handlers import MLFlowHandler


def shareable_paths(value: Any, dataset_dir: str | os.PathLike | None) -> Any:
    """``value`` (JSON data) with every absolute path made relative (see module docstring), keys included."""
    if isinstance(value, dict):
        return {shareable_paths(k, dataset_dir): shareable_paths(v, dataset_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [shareable_paths(v, dataset_dir) for v in value]
    if not isinstance(value, str):
        return value
    root = os.path.abspath(os.path.expanduser(dataset_dir)) if dataset_dir else None
    if os.path.isabs(value):
        path = os.path.normpath(value)
        if root and path == root:
            return os.path.basename(root)
        if root and path.startswith(root + os.sep):
            return os.path.relpath(path, root)
        return os.path.basename(path)
    if root and root != os.sep:  # a path inside a longer string (an expression)
        value = value.replace(root + os.sep, "").replace(root, os.path.basename(root))
    return value


class ShareableMLFlowHandler(MLFlowHandler):
    """``MLFlowHandler`` whose JSON artifacts carry paths relative to ``dataset_dir``.

    Args:
        dataset_dir: the dataset directory of the run (paths under it are logged relative to it).
        log_paths: log the artifacts as they are, absolute paths included (``--tracking-log-paths``).
        kwargs: ``MLFlowHandler`` arguments.
    """

    def __init__(self, dataset_dir: str | os.PathLike | None = None, log_paths: bool = False, **kwargs: Any) -> None:
        if not isinstance(log_paths, bool):  # fire hands "--tracking-log-paths false" over as the string "false"
            raise ValueError(f"tracking_log_paths must be True or False, got {log_paths!r}")
        super().__init__(**kwargs)
        self.dataset_dir = dataset_dir
        self.log_paths = log_paths

    def complete(self) -> None:
        if self.log_paths or not (self.artifacts and self.cur_run):
            return super().complete()
        with tempfile.TemporaryDirectory() as folder:
            for artifact in self._parse_artifacts():
                self.client.log_artifact(self.cur_run.info.run_id, self._shareable_copy(artifact, folder))

    def _shareable_copy(self, artifact: str, folder: str) -> str:
        """A copy of a JSON ``artifact`` in ``folder`` under the same name, its paths made shareable."""
        if not artifact.endswith(".json"):
            return artifact
        copy = Path(folder) / Path(artifact).name
        data = shareable_paths(json.loads(Path(artifact).read_text()), self.dataset_dir)
        copy.write_text(json.dumps(data, indent=2))
        return str(copy)
