"""metrics_<split>.json: ``num_cases`` counts cases (patients) in both families, however many volumes each scores."""

from __future__ import annotations

import json

import torch
from ignite.engine import Engine, Events

from prod9_components.handlers.metrics_json import MetricsJSONWriter


def evaluate(tmp_path, batches: list, name: str) -> dict:
    engine = Engine(lambda engine, batch: None)
    engine.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(psnr=torch.tensor(20.5)))
    writer = MetricsJSONWriter(str(tmp_path / f"{name}.json"), "test", checkpoint=None)
    writer.attach(engine)
    engine.run(batches, max_epochs=1)
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_num_cases_counts_cases_not_volumes(tmp_path):
    image = torch.zeros(2, 1, 4, 4, 4)
    # stage 1 / MAISI: one item per case x modality, two per batch -> 2 cases in 8 volumes
    volumes = [{"image": image, "case": ["A", "A"]}, {"image": image, "case": ["A", "A"]},
               {"image": image, "case": ["B", "B"]}, {"image": image, "case": ["B", "B"]}]
    # MaskGiT transformers: one item per case (its 4 modalities in one token grid), decollated
    cases = [[{"tokens": torch.zeros(4, 2, 2, 2), "case": "A"}], [{"tokens": torch.zeros(4, 2, 2, 2), "case": "B"}]]
    first, second = evaluate(tmp_path, volumes, "volumes"), evaluate(tmp_path, cases, "cases")
    assert first["num_cases"] == second["num_cases"] == 2 and first["psnr"] == 20.5
    assert evaluate(tmp_path, [{"image": image}, {"image": image[:1]}], "unnamed")["num_cases"] == 3  # items
