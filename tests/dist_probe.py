"""Test-only handlers layered onto a bundle run: which items each rank saw and its metrics; learning rates."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events


class SeenItems:
    """Write ``<output_dir>/seen_<tag>_rank<r>.json``: ``{"items": {epoch: ["case/modality", ...]}, "metrics": {...}}``
    - per epoch, every item this rank's batches held, and the engine's numeric metrics when it last completed."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)

    def attach(self, engine: Engine, tag: str = "train") -> None:
        seen: dict[int, list[str]] = {}
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.record(e, seen))
        engine.add_event_handler(Events.COMPLETED, lambda e: self.write(e, tag, seen))

    @staticmethod
    def record(engine: Engine, seen: dict[int, list[str]]) -> None:
        batch = engine.state.batch
        rows = batch if isinstance(batch, list) else [batch]  # decollated or not
        for row in rows:
            cases = [row["case"]] if isinstance(row["case"], str) else list(row["case"])
            modalities = row.get("modality")  # token items hold every modality
            modalities = ["all"] * len(cases) if modalities is None else torch.as_tensor(modalities).reshape(-1).tolist()
            seen.setdefault(engine.state.epoch, []).extend(f"{c}/{m}" for c, m in zip(cases, modalities))

    def write(self, engine: Engine, tag: str, seen: dict[int, list[str]]) -> None:
        """A resumed run adds its epochs to the items of the run it continues."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        path = self.output_dir / f"seen_{tag}_rank{rank}.json"
        items = json.loads(path.read_text())["items"] if path.exists() else {}
        path.write_text(json.dumps({"items": {**items, **{str(k): v for k, v in seen.items()}}, "metrics": metrics}))


class LearningRates:
    """Write ``<output_dir>/learning_rates.json``: ``{iteration: learning rate of the optimizer's first group}``,
    read after every iteration (after the schedule stepped); attach after the bundle's own handlers."""

    def __init__(self, output_dir: str, optimizer: torch.optim.Optimizer) -> None:
        self.path = Path(output_dir) / "learning_rates.json"
        self.optimizer = optimizer
        self.lrs: dict[int, float] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, lambda e: self.path.write_text(json.dumps(self.lrs)))

    def record(self, engine: Engine) -> None:
        self.lrs[engine.state.iteration] = self.optimizer.param_groups[0]["lr"]
