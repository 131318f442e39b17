"""Test-only handler layered onto a bundle run: records which training items each rank saw."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
from ignite.engine import Engine, Events


class SeenItems:
    """Write ``<output_dir>/seen_rank<r>.json``: per epoch, the ``"case/modality"`` of every training item this
    rank's batches held."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.seen: dict[int, list[str]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def record(self, engine: Engine) -> None:
        batch = engine.state.batch
        rows = batch if isinstance(batch, list) else [batch]  # decollated or not
        for row in rows:
            cases = [row["case"]] if isinstance(row["case"], str) else list(row["case"])
            modalities = row.get("modality")  # token items hold every modality
            modalities = ["all"] * len(cases) if modalities is None else [int(m) for m in modalities.reshape(-1)]
            self.seen.setdefault(engine.state.epoch, []).extend(f"{c}/{m}" for c, m in zip(cases, modalities))

    def write(self, engine: Engine) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        (self.output_dir / f"seen_rank{rank}.json").write_text(json.dumps(self.seen))
