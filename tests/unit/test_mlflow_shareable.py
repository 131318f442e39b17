"""``--tracking mlflow`` logs data paths relative to the dataset directory unless ``tracking_log_paths`` is true: a
real MLflow store (local SQLite) is written by the handler on a one-iteration Ignite run and read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ignite.engine import Engine
from monai.bundle import ConfigParser, ConfigWorkflow

from prod9_components.handlers.mlflow_shareable import ShareableMLFlowHandler, shareable_paths
from prod9_components.tracking import mlflow_settings

mlflow = pytest.importorskip("mlflow")


def datalist(data: Path) -> dict:
    return {"training": [{"case": "P1", "t1": str(data / "P1" / "P1_t1.nii.gz")}], "dataset_dir": str(data),
            "expression": f"$os.path.join('{data}', 'P1')", "checkpoint": "/home/someone/run/best.ckpt", "epochs": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One local MLflow store for the module (creating one takes seconds)."""
    return tmp_path_factory.mktemp("store")


def logged_datalist(tmp_path: Path, store: Path, log_paths: bool) -> dict:
    """Run the handler once over a datalist.json naming files under ``tmp_path/patients``; return what MLflow
    stored."""
    data, run, experiment = tmp_path / "patients", tmp_path / "run", f"log_paths_{log_paths}"
    run.mkdir()
    (run / "datalist.json").write_text(json.dumps(datalist(data)))
    handler = ShareableMLFlowHandler(dataset_dir=str(data), log_paths=log_paths,
                                     tracking_uri=f"sqlite:///{store / 'mlruns.db'}", experiment_name=experiment,
                                     artifacts=[str(run / "datalist.json")], iteration_log=False, epoch_log=False,
                                     close_on_complete=True)
    engine = Engine(lambda engine, batch: 0.0)
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlruns.db'}")
    (stored,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    path = client.download_artifacts(stored.info.run_id, "datalist.json", str(tmp_path / "download"))
    assert json.loads((run / "datalist.json").read_text()) == datalist(data)  # the run keeps its own file
    return json.loads(Path(path).read_text())


def test_data_paths_are_logged_relative_to_the_dataset(tmp_path, store):
    logged = logged_datalist(tmp_path, store, log_paths=False)
    assert logged == {"training": [{"case": "P1", "t1": "P1/P1_t1.nii.gz"}], "dataset_dir": "patients",
                      "expression": "$os.path.join('patients', 'P1')", "checkpoint": "best.ckpt", "epochs": 2}
    stored = [p for p in store.rglob("*") if p.is_file()]  # the database and the artifacts
    assert len(stored) >= 2 and not [p for p in stored if str(tmp_path / "patients").encode() in p.read_bytes()]


def test_absolute_paths_are_logged_when_asked(tmp_path, store):
    assert logged_datalist(tmp_path, store, log_paths=True) == datalist(tmp_path / "patients")


@pytest.mark.parametrize("override, expected", [({}, False), ({"tracking_log_paths": True}, True)])
def test_tracking_log_paths_is_a_bundle_id_defaulting_to_false(tmp_path, override, expected):
    """The id the commands' ``--tracking-log-paths`` flag sets reaches the handler the settings add."""
    parser = ConfigParser({"dataset_dir": str(tmp_path / "patients"), "output_dir": str(tmp_path), "bundle_root": ".",
                           "tracking_uri": "http://127.0.0.1:9",  # a client that connects to nothing until used
                           "train": {"trainer": {"_target_": "ignite.engine.Engine", "process_function": "$None"},
                                     "handlers": []}, **override}, globals={"os": "os"})
    ConfigWorkflow.patch_bundle_tracking(parser, mlflow_settings())
    (handler,) = parser.get_parsed_content("train#handlers")
    assert isinstance(handler, ShareableMLFlowHandler) and handler.log_paths is expected
    assert handler.dataset_dir == str(tmp_path / "patients")


def test_a_path_outside_the_dataset_keeps_only_its_name():
    assert shareable_paths({"/data/brats": ["/data/brats/C1/x.nii.gz", "/data/bratsX/y.nii.gz", "rel/z"]},
                           "/data/brats") == {"brats": ["C1/x.nii.gz", "y.nii.gz", "rel/z"]}


def test_tracking_log_paths_must_be_a_boolean():
    with pytest.raises(ValueError, match="^tracking_log_paths must be True or False, got 'false'$"):
        ShareableMLFlowHandler(dataset_dir="/data", log_paths="false", tracking_uri="http://127.0.0.1:9")
