"""The export a run trains on, kept in its last.ckpt so that a resume on another export is refused.

A stage-2 run reads a stage-1 export (a stage-3 run, a stage-2 checkpoint too); its best.ckpt records the path and
sha256 (``CheckpointHandler(extra=...)``). Put an :class:`ExportLink` in the handler's ``save_dict`` and last.ckpt
records them as well: resuming with an export whose bytes differ (stage 1 retrained, another file at that path)
raises instead of continuing to train on tokens or latents of another encoder.
"""

from __future__ import annotations

import os


class ExportLink:
    """A ``save_dict`` entry of :class:`~prod9_components.handlers.checkpoint.CheckpointHandler`.

    Args:
        path: the export this run reads.
        sha256: hex SHA-256 of the bytes it was loaded from (:func:`prod9_components.networks.export.read_record`).
        what: what the file is, for the message (e.g. ``"stage-1 export"``).
    """

    def __init__(self, path: str | os.PathLike, sha256: str, what: str = "export") -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.sha256 = str(sha256)
        self.what = what

    def state_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256}

    def load_state_dict(self, state: dict) -> None:
        """Raise a one-line ValueError naming both files when the resumed run was trained on other bytes."""
        if state.get("sha256") != self.sha256:
            raise ValueError(
                f"{self.path}: this {self.what} (sha256 {self.sha256[:12]}…) is not the one the run being resumed "
                f"was trained on, {state.get('path')} (sha256 {str(state.get('sha256'))[:12]}…); pass that file, or "
                f"start a new run in another output_dir")
