"""Write an evaluator's metrics as one flat JSON object (DESIGN §2: ``metrics_<split>.json``, one file per split so
``validate`` and ``test`` never replace each other's)."""

from __future__ import annotations

import logging
import math

import torch
from ignite.engine import Engine, Events

from prod9_components.atomic import write_json
from prod9_components.handlers.checkpoint import is_rank_zero
from prod9_components.outputs import check_outputs

logger = logging.getLogger("prod9")


class MetricsJSONWriter:
    """At the end of an evaluation write ``{metric: value, ..., "split", "num_cases", "checkpoint"}``.

    ``num_cases`` is the number of cases (patients) the evaluation read, whatever a stage scores per case: one volume
    per item for the stage-1 models and MAISI, all four modalities at once for the MaskGiT transformers. Cases are
    told apart by the items' ``"case"`` name; an item without one counts as a case of its own.

    Args:
        output_path: the JSON file (``<output_dir>/metrics_<split>.json``).
        split: which data was evaluated ("validation", "test").
        checkpoint: the checkpoint evaluated.
        extra: further constant fields to record (e.g. modality names).
        overwrite: replace an existing file; else it is refused here, before the evaluation runs.
    """

    def __init__(self, output_path: str, split: str, checkpoint: str | None = None, extra: dict | None = None,
                 overwrite: bool = False):
        if is_rank_zero():  # the only rank that writes
            check_outputs([output_path], inputs=[checkpoint] if checkpoint else [], overwrite=overwrite)
        self.output_path = output_path
        self.split = split
        self.checkpoint = checkpoint
        self.extra = dict(extra or {})
        self.cases: set[str] = set()
        self.unnamed = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _reset(self, engine: Engine) -> None:
        self.cases, self.unnamed = set(), 0

    def _count(self, engine: Engine) -> None:
        batch = engine.state.batch  # decollated: a list of items; else a dict of batched values
        names = [item.get("case") for item in batch] if isinstance(batch, list) else batch.get("case")
        if isinstance(names, str):
            names = [names]
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            self.cases.update(names)
        elif isinstance(batch, list):
            self.unnamed += len(batch)
        else:
            self.unnamed += next(int(v.shape[0]) for v in batch.values() if torch.is_tensor(v))

    @property
    def num_cases(self) -> int:
        return len(self.cases) + self.unnamed

    def write(self, engine: Engine) -> None:
        metrics = {k: _number(v) for k, v in engine.state.metrics.items()}
        num_cases = self.num_cases
        metrics.update(self.extra, split=self.split, num_cases=num_cases,
                       checkpoint=str(self.checkpoint) if self.checkpoint else None)
        if is_rank_zero():
            write_json(metrics, self.output_path)
            summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            logger.info(f"{self.split}: {summary} ({num_cases} cases) -> {self.output_path}")


def _number(value) -> float | None:
    """Plain float for JSON; non-finite values become null (JSON has no NaN)."""
    value = float(value.item() if hasattr(value, "item") else value)
    return value if math.isfinite(value) else None
