"""MONAI's TensorBoardStatsHandler with an event file on rank 0 only, opened when the first value is written.

Why: torch's ``SummaryWriter`` creates its event file when it is constructed, and every rank of a ``torchrun`` job
builds the bundle's handler lists before ``for_this_rank`` drops the user-output ones, so rank 1 left two empty
event files in the shared ``<output_dir>/logs``. Opening lazily also keeps runs that log nothing (a ``validate``
verb with no scalar) from leaving empty files.
"""

from __future__ import annotations

from monai.handlers import TensorBoardStatsHandler as MonaiTensorBoardStatsHandler

from prod9_components.handlers.checkpoint import is_rank_zero

__all__ = ["RankZeroSummaryWriter", "TensorBoardStatsHandler"]


def _ignore(*args, **kwargs) -> None:
    return None


class RankZeroSummaryWriter:
    """Stands in for ``torch.utils.tensorboard.SummaryWriter(log_dir)``: the real writer is built on first use and on
    rank 0 only; on other ranks every method does nothing.

    Args:
        log_dir: TensorBoard log directory (created with the first event file).
    """

    def __init__(self, log_dir: str) -> None:
        self.log_dir = str(log_dir)
        self._writer = None

    def __getattr__(self, name: str):
        # Only reached for names this class does not define: SummaryWriter's add_scalar, flush, ...
        if not is_rank_zero():
            return _ignore
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return getattr(self._writer, name)

    def flush(self) -> None:
        if self._writer is not None:  # MONAI flushes after every epoch, even with nothing written: open no file
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class TensorBoardStatsHandler(MonaiTensorBoardStatsHandler):
    """``monai.handlers.TensorBoardStatsHandler`` (same arguments) whose own writer is a :class:`RankZeroSummaryWriter`.

    Args:
        summary_writer: a writer to use instead (then this handler neither opens nor closes one).
        log_dir: where the handler's own writer puts its event file.
        kwargs: the other arguments of MONAI's handler (``tag_name``, ``output_transform``, ``iteration_log``, ...).
    """

    def __init__(self, summary_writer=None, log_dir: str = "./runs", **kwargs) -> None:
        own = summary_writer is None
        super().__init__(summary_writer=RankZeroSummaryWriter(log_dir) if own else summary_writer, log_dir=log_dir,
                         **kwargs)
        self.internal_writer = own  # close() closes the writer this handler made, as MONAI's does
