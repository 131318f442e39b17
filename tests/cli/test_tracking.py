"""MLflow tracking to a local store: a training run through `python -m monai.bundle run --tracking <settings file>`
and an evaluation run through `prod9-train-autoencoder validate --tracking mlflow` land in one experiment, with the
numbers the run itself wrote."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prod9_components.tracking import mlflow_settings
from tests.helpers import ROOT, cli, run_module

mlflow = pytest.importorskip("mlflow")  # in the dev extra; the tracking extra installs it for users

BUNDLE = ROOT / "bundles" / "maskgit_stage1" / "configs"


def test_training_and_evaluation_runs_are_tracked(demo_dataset_dir, tmp_path):
    out = tmp_path / "run dir"  # a path with a space
    settings = tmp_path / "mlflow.json"
    settings.write_text(json.dumps(mlflow_settings()))  # what `python -m prod9_components.tracking` prints
    configs = json.dumps([str(BUNDLE / "train.json"), str(BUNDLE / "tiny.json")])
    trained = run_module("monai.bundle", [
        "run", "--config_file", configs, "--meta_file", str(BUNDLE / "metadata.json"), "--bundle_root",
        str(BUNDLE.parent), "--dataset_dir", demo_dataset_dir, "--output_dir", str(out), "--tracking", str(settings),
        "--roi_size", "[16,16,16]", "--spacing", "[4.0,4.0,4.0]", "--epochs", "2", "--limit_train_batches", "3",
        "--limit_val_batches", "1", "--val_interval", "1"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    cli("prod9-train-autoencoder", "validate", "--config", str(BUNDLE / "tiny.json"), "--output-dir", str(out),
        "--dataset-dir", demo_dataset_dir, "--spacing", "4", "4", "4", "--limit-val-batches", "1",
        "--tracking", "mlflow")

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("maskgit_stage1")
    assert experiment is not None
    evaluation, training = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert training.info.status == evaluation.info.status == "FINISHED"

    losses = client.get_metric_history(training.info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, 7))  # every iteration of 2 epochs x 3 batches
    assert all(math.isfinite(m.value) and m.value > 0 for m in losses)
    assert [m.step for m in client.get_metric_history(training.info.run_id, "psnr")] == [1, 2]  # each validation
    assert sorted(a.path for a in client.list_artifacts(training.info.run_id))[-1] == "datalist.json"

    metrics = json.loads((out / "metrics_validation.json").read_text())  # what the evaluation wrote itself
    assert evaluation.data.metrics["psnr"] == pytest.approx(metrics["psnr"], rel=1e-6)
    assert evaluation.data.metrics["ssim"] == pytest.approx(metrics["ssim"], rel=1e-6)
    artifacts = sorted(a.path for a in client.list_artifacts(evaluation.info.run_id))
    assert artifacts[-1] == "metrics_validation.json" and artifacts[0].startswith("config_")
    executed = json.loads(Path(client.download_artifacts(evaluation.info.run_id, artifacts[0], str(tmp_path)))
                          .read_text())
    assert executed["output_dir"] == "run dir" and executed["split"] == "validation"  # a name, not the path

    # Case names relative to the dataset, not absolute patient paths, anywhere MLflow stored something.
    datalist = json.loads(Path(client.download_artifacts(training.info.run_id, "datalist.json", str(tmp_path / "d")))
                          .read_text())
    case = datalist["validation"][0]
    assert case["t1"] == f"{case['case']}/{case['case']}_t1.nii.gz", case
    assert executed["dataset_dir"] == Path(demo_dataset_dir).name
    for run in (training, evaluation):
        client.download_artifacts(run.info.run_id, "", str(tmp_path / "all" / run.info.run_id))
        assert str(demo_dataset_dir) not in json.dumps([run.data.params, run.data.tags])
    stored = [out / "mlruns.db", *(p for p in (tmp_path / "all").rglob("*") if p.is_file())]
    assert len(stored) == 5 and not [p for p in stored if str(demo_dataset_dir).encode() in p.read_bytes()]
    assert str(demo_dataset_dir) in (out / "datalist.json").read_text()  # the run's own files keep the paths
    # MONAI's artifact URI, undecoded, put the artifacts in this sibling folder (MLflow still makes it, empty)
    assert not [p for p in (tmp_path / "run%20dir").rglob("*") if p.is_file()]
    assert (out / "mlruns" / training.info.run_id / "artifacts" / "datalist.json").is_file()


def test_tracking_without_mlflow_is_one_line_naming_the_install(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    result = cli("prod9-train-autoencoder", "validate", "--config", str(BUNDLE / "tiny.json"), "--tracking", "mlflow",
                 check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --tracking mlflow needs MLflow: pip install mlflow "
                                     "(or: pip install -e '.[tracking]')")
