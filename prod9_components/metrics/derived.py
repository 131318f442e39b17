"""Metrics computed at the end of an epoch from other metrics of the same engine, not from its outputs."""

from __future__ import annotations

from collections.abc import Mapping

from ignite.engine import Engine
from ignite.metrics import Metric

__all__ = ["DerivedMetric"]


class DerivedMetric(Metric):
    """Base of a metric whose value is a function of ``engine.state.metrics`` at epoch end (a verdict, a ratio).

    Subclasses implement :meth:`derive`. Attach it AFTER the metrics it reads: put it last in an evaluator's
    ``additional_metrics`` (Ignite completes metrics in the order they were attached). Under DDP the metrics it reads
    are already reduced across ranks, so every rank derives the same value.
    """

    def derive(self, metrics: Mapping) -> tuple[float, dict[str, float]]:
        """``(value, extra)``: the metric's own value and further keys to store beside it."""
        raise NotImplementedError

    def reset(self) -> None:
        pass

    def update(self, output) -> None:
        pass

    def iteration_completed(self, engine: Engine) -> None:  # reads no output
        pass

    def compute(self) -> float:
        raise NotImplementedError(f"{type(self).__name__} is derived from other metrics in completed()")

    def completed(self, engine: Engine, name: str) -> None:
        value, extra = self.derive(engine.state.metrics)
        engine.state.metrics.update(extra)
        engine.state.metrics[name] = value
