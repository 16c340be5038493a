"""Test set-up: a throw-away embedded Airflow (SQLite) configured before Airflow is imported."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="odapi-test-airflow-"))

os.environ.update({
    "AIRFLOW_HOME": str(_AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME}/airflow.db",
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
})


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata DB for `dag.test()` runs."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True,
                   capture_output=True, env=os.environ)
    return _AIRFLOW_HOME


@pytest.fixture(scope="module")
def dag_bundle(tmp_path_factory):
    """A DAG bundle folder for test DAGs: dag.test() runs only DAGs it finds in a bundle."""
    folder = tmp_path_factory.mktemp("test-dags")
    bundles = [{"name": "odapi-test-dags", "kwargs": {"path": str(folder)},
                "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle"},
               {"name": "dags-folder", "kwargs": {},
                "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle"}]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(bundles))
        yield folder


def prepare_records(root: Path, count: int = 16, seed: int = 7, classes: tuple[str, ...] = (
        "circle", "square", "triangle")) -> Path:
    """Sample export -> ingest -> images -> verify -> label map -> TFRecords; the records dir."""
    from odapi_operators.core.data.fetch import fetch_images
    from odapi_operators.core.data.ingest import ingest
    from odapi_operators.core.data.label_map import build_label_map
    from odapi_operators.core.data.sample_data import generate
    from odapi_operators.core.data.shard import write_shards
    from odapi_operators.core.data.verify import verify_images

    from odapi_operators.core.data.sample_data import Look

    generate(root / "export", count=count, seed=seed, max_side=128, look=Look(classes=classes))
    ingest([str(root / "export")], root / "ingest")
    fetch_images(root / "ingest" / "manifest.jsonl", root / "images")
    verify_images(root / "images" / "manifest.jsonl", root / "verify")
    build_label_map(root / "verify" / "manifest.jsonl", root / "label_map")
    write_shards(root / "verify" / "manifest.jsonl", root / "label_map" / "label_map.pbtxt",
                 root / "records", {"train": 0.6, "val": 0.4}, {"train": 1, "val": 1})
    return root / "records"


def odapi(*args: str, check: bool = True, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess:
    """Run `python -m odapi_operators ARGS` (a real child process, as the operators do)."""
    done = subprocess.run([sys.executable, "-m", "odapi_operators", *args],
                          capture_output=True, text=True, env=env or os.environ)
    if check and done.returncode != 0:
        raise AssertionError(f"odapi {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


SAMPLE_MODEL = ROOT / "include/configs/models/retinanet_mobile_sample.yaml"
TINY_MODEL = ROOT / "tests/support/tiny_model.yaml"


def _merged(base: dict, overrides: dict) -> dict:
    return {**base, **{key: _merged(base.get(key, {}), value) if isinstance(value, dict)
                       else value for key, value in overrides.items()}}


def tiny_model_config(folder: Path, **trainer: Any) -> Path:
    """The model config of tests that check mechanics, not accuracy: the sample model's
    recipe with tests/support/tiny_model.yaml's small network (which keeps every detection),
    `trainer` settings on top (e.g. steps_per_loop); written to `folder`, its path."""
    import yaml

    config = _merged(yaml.safe_load(SAMPLE_MODEL.read_text()),
                     yaml.safe_load(TINY_MODEL.read_text()))
    config["params"]["trainer"].update(trainer)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_model.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def join_all(processes, timeout: float) -> None:
    """Wait for child processes that race on shared state; each must exit cleanly."""
    for proc in processes:
        proc.join(timeout)
        assert proc.exitcode == 0, f"{proc.name} exited {proc.exitcode}"


TRAINED_STEPS, TRAINED_LOOP = 60, 10


def built_once(tmp_path_factory, name: str, build: Callable[[Path], dict[str, Any]]
               ) -> dict[str, Any]:
    """`build(folder)` once per test run, its JSON result for every caller. Under
    pytest-xdist each worker has its own session fixtures: the first worker to ask builds into
    a folder all workers share while the others wait on the lock, then read what it built
    (a TensorFlow training or export costs minutes; two would cost both cores)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-<n>/, above each worker's popen-gw<i>/
    folder, done = shared / name, shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a failed build's leftovers
            folder.mkdir()
            done.write_text(json.dumps(build(folder)))
    return json.loads(done.read_text())


def _train_tiny_model(root: Path) -> dict[str, str]:
    records = prepare_records(root, count=24)
    config = tiny_model_config(root, steps_per_loop=TRAINED_LOOP, summary_interval=TRAINED_LOOP)
    model_dir = root / "model"
    odapi("train", "--model-config", str(config), "--data", str(records), "--out",
          str(model_dir), "--steps", str(TRAINED_STEPS), "--batch-size", "4")
    return {"root": str(root), "records": str(records), "model_dir": str(model_dir),
            "config": str(config)}


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> dict[str, Path]:
    """The tiny test model (`tiny_model_config`) trained for 60 real steps in 10-step loops
    on tiny sample records, shared by every test that needs a model: long enough for its loss
    to have fallen (the warm-start test starts from it), and its first loop is a fresh
    start's. Read-only: a test that changes it copies it first."""
    built = built_once(tmp_path_factory, "trained", _train_tiny_model)
    return {key: Path(value) for key, value in built.items()}


GCS_BUCKET = "odapi-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio (its own venv, SQLite, offline) on 127.0.0.1 for the session."""
    from support.label_studio import label_studio_venv, start_label_studio

    venv = label_studio_venv()
    server = start_label_studio(venv, tmp_path_factory.mktemp("label-studio"), free_port(),
                                tmp_path_factory.mktemp("label-studio-files"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gcs_emulator():
    """An in-memory emulator with bucket `odapi-test`; STORAGE_EMULATOR_HOST points at it."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        try:
            yield f"gs://{GCS_BUCKET}"
        finally:
            server.stop()


@pytest.fixture(scope="module")
def gcs_with_preconditions(gcs_emulator):
    """The emulator, made to honour `ifGenerationMatch` on uploads as GCS does (HTTP 412).

    gcp-storage-emulator ignores the parameter, so without this every conditional write would
    "win" and the gs:// serialization tests would prove nothing.
    """
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    lock = threading.Lock()

    def guarded(upload):
        def handler(request, response, storage):
            wanted = request.query.get("ifGenerationMatch")
            with lock:  # check and create as one step, like the real service
                if wanted is not None:
                    name = (request.query["name"][0] if "name" in request.query
                            else request.data["meta"]["name"])
                    try:
                        obj = storage.get_file_obj(request.params["bucket_name"], name)
                        current = int(obj["generation"])
                    except NotFound:
                        current = 0
                    if current != int(wanted[0]):
                        response.status = HTTPStatus.PRECONDITION_FAILED
                        response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                        return None
                return upload(request, response, storage)
        return handler

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(objects, "_media_upload", guarded(objects._media_upload))
        patch.setattr(objects, "_multipart_upload", guarded(objects._multipart_upload))
        yield gcs_emulator


@pytest.fixture(scope="session")
def exported_model(trained_model, tmp_path_factory) -> Path:
    """The trained model exported once (`odapi export`, image_bytes input: binary requests
    over both Serving protocols, a decision.json extra); the SavedModel folder (its export
    summary is `../summary.json`), shared by the Serving and export tests. Read-only."""
    def export(root: Path) -> dict[str, str]:
        (root / "decision.json").write_text(json.dumps({"promoted": True}))
        out = root / "export"
        odapi("export", "--model-dir", str(trained_model["model_dir"]), "--data",
              str(trained_model["records"]), "--out", str(out), "--input-type", "image_bytes",
              "--model-name", "shapes", "--extras", str(root / "decision.json"))
        return {"saved_model": str(out / "saved_model")}

    return Path(built_once(tmp_path_factory, "exported", export)["saved_model"])


@pytest.fixture()
def load_dag():
    """A loader for a DAG file of dags/ (`load_dag("odapi_retrain")`), imported afresh each
    call: the file reads $ODAPI_PIPELINE_CONFIG at parse time, so set that first."""
    import importlib.util

    from airflow.sdk import DAG

    def load(name: str) -> DAG:
        spec = importlib.util.spec_from_file_location(f"{name}_under_test",
                                                      ROOT / "dags" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.dag

    return load


@pytest.fixture()
def database() -> Iterator[str]:
    """A fresh PostgreSQL database for an Airflow metadata DB of the production paths (SQLite
    locks up, "database is locked", when a CLI and a scheduler write at once); dropped
    afterwards. PostgreSQL and Redis are probed first, so the message names all that is
    missing (support/production.py `require`)."""
    from support.production import postgres_database, require

    require("PostgreSQL", "Redis")
    with postgres_database() as name:
        yield name


@pytest.fixture()
def broker() -> Iterator[int]:
    """An empty Redis db number for a Celery cluster (flushed afterwards)."""
    from support.production import redis_database

    with redis_database() as number:
        yield number
