"""Which engine handlers a distributed rank runs: the ones that write for the user run on rank 0 only."""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist

__all__ = ["for_this_rank"]


def _user_output_types() -> tuple[type, ...]:
    """Handlers that log, draw, sample or write files for the user; one copy of their output is enough."""
    from monai.handlers import StatsHandler
    from monai.handlers.tensorboard_handlers import TensorBoardHandler

    from prod9_components.handlers.maisi_samples import MaisiSamplesHandler
    from prod9_components.handlers.maskgit_samples import MaskGiTSamplesHandler
    from prod9_components.handlers.metrics_json import MetricsJSONWriter
    from prod9_components.handlers.progress import ProgressBarHandler
    from prod9_components.handlers.tensorboard_images import MidSliceImageHandler

    return (StatsHandler, TensorBoardHandler, ProgressBarHandler, MidSliceImageHandler, MaisiSamplesHandler,
            MaskGiTSamplesHandler, MetricsJSONWriter)


def for_this_rank(handlers: Sequence) -> list:
    """All ``handlers`` on rank 0 or without ``torch.distributed``; on the other ranks, all but the user-output ones.

    A list of exclusions rather than of inclusions: a handler this module does not know (a learning-rate schedule,
    early stopping) must keep running on every rank, or the ranks would drift apart. Metrics computed by the
    sampling handlers then exist on rank 0 only, the rank that writes checkpoints and logs.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        return list(handlers)
    return [h for h in handlers if not isinstance(h, _user_output_types())]
