"""AnnotationExportSensor and its trigger in real `dag.test()` runs, local and on a GCS emulator."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from odapi_operators.core import storage
from odapi_operators.core.config import freeze_config, load_pipeline_config
from odapi_operators.sensors import AnnotationExportSensor
from odapi_operators.triggers import AnnotationExportTrigger

pytestmark = pytest.mark.timeout(60)


def _frozen_config(tmp_path: Path, exports: str, marker: str | None = "_SUCCESS") -> str:
    config = {"home": str(tmp_path), "exports": {"path": exports, "marker": marker},
              "train": {"model_config": "unused.yaml", "steps": 1},
              "serving": {"base": "serving", "model_name": "m"}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return freeze_config(load_pipeline_config(path), tmp_path / "frozen")


def _write_export(root: str, name: str, marker: str | None = "_SUCCESS") -> str:
    storage.write_text(f"{root}/{name}/ann.xml", "<annotation/>")
    if marker:
        storage.write_text(f"{root}/{name}/{marker}", "")
    return f"{root}/{name}"


_DAG_FILE = """
import json
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, task

from odapi_operators.sensors import AnnotationExportSensor

with DAG({dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1)) as dag:
    wait = AnnotationExportSensor(task_id="wait", config={config!r}, poke_interval=0.2,
                                  timeout=30, **{kwargs!r})

    @task
    def record(exports):
        Path({received!r}).write_text(json.dumps(exports))

    record(wait.output)
"""


def _run_sensor_dag(tmp_path: Path, bundle: Path, config: str, later=None, **sensor_kwargs):
    """dag.test() of wait (the sensor) >> record; returns what `record` received.

    `later` runs in a thread 2 s after the sensor task has started.
    """
    dag_id = f"test_export_sensor_{uuid.uuid4().hex[:8]}"
    writer = _after_sensor_starts(dag_id, later) if later else None
    received = tmp_path / f"{dag_id}.json"
    dag_file = bundle / f"{dag_id}.py"
    dag_file.write_text(_DAG_FILE.format(dag_id=dag_id, config=config, kwargs=sensor_kwargs,
                                         received=str(received)))
    spec = importlib.util.spec_from_file_location(dag_id, dag_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag_run = module.dag.test()
    if writer:
        writer.join()
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "success", states
    return json.loads(received.read_text())


def _after_sensor_starts(dag_id: str, action, delay: float = 2.0) -> threading.Thread:
    """Run `action` `delay` s after the sensor task has started executing.

    "Started" = its rendered template fields are in the metadata DB: written when a task
    starts, and kept while it is deferred (its state then moves through queued/deferred).
    """
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as Rendered
    from airflow.utils.session import create_session
    from sqlalchemy import select

    query = select(Rendered.task_id).where(Rendered.dag_id == dag_id, Rendered.task_id == "wait")
    with create_session() as session:  # here, so the thread imports nothing (import locks)
        session.scalar(query)

    def wait_then_act() -> None:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            with create_session() as session:
                if session.scalar(query):
                    break
            time.sleep(0.05)
        else:
            return  # never started: the run fails on its own
        time.sleep(delay)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("deferrable", [True, False], ids=["deferrable", "poke"])
def test_existing_export_is_returned(tmp_path, airflow_db, dag_bundle, deferrable):
    exports = tmp_path / "exports"
    done = _write_export(str(exports), "batch-1")
    _write_export(str(exports), "batch-2", marker=None)  # incomplete: no marker yet
    received = _run_sensor_dag(tmp_path, dag_bundle, _frozen_config(tmp_path, "exports"),
                               deferrable=deferrable)
    assert received == [done]


@pytest.mark.parametrize("deferrable", [True, False], ids=["deferrable", "poke"])
def test_export_written_after_the_sensor_starts_is_picked_up(tmp_path, airflow_db, dag_bundle,
                                                             deferrable, caplog):
    exports = str(tmp_path / "exports")
    _write_export(exports, "batch-1", marker=None)  # uploading; marker comes later
    received = _run_sensor_dag(
        tmp_path, dag_bundle, _frozen_config(tmp_path, "exports"), deferrable=deferrable,
        later=lambda: storage.write_text(f"{exports}/batch-1/_SUCCESS", ""))
    assert received == [f"{exports}/batch-1"]
    assert ("running trigger in line" in caplog.text) == deferrable


def test_inactivity_without_marker_in_poke_mode(tmp_path, airflow_db, dag_bundle):
    exports = str(tmp_path / "exports")
    export = _write_export(exports, "batch-1", marker=None)
    started = time.monotonic()
    config = _frozen_config(tmp_path, "exports", marker=None)
    received = _run_sensor_dag(tmp_path, dag_bundle, config, inactivity_seconds=1)
    assert received == [export]
    assert time.monotonic() - started >= 1


def test_gcs_export_in_deferrable_mode(tmp_path, airflow_db, dag_bundle,
                                       gcs_emulator, caplog):  # noqa: F811
    root = f"{gcs_emulator}/exports-{uuid.uuid4().hex[:8]}"
    _write_export(root, "batch-0", marker=None)  # never completed
    received = _run_sensor_dag(tmp_path, dag_bundle, _frozen_config(tmp_path, root),
                               deferrable=True, later=lambda: _write_export(root, "batch-1"))
    assert received == [f"{root}/batch-1"]
    assert "running trigger in line" in caplog.text


def test_constructor_overrides_the_configured_marker(tmp_path):
    config = _frozen_config(tmp_path, "exports", marker="_SUCCESS")
    sensor = AnnotationExportSensor(task_id="w", config=config, marker="", inactivity_seconds=5)
    assert sensor.watch() == (str(tmp_path / "exports"), None, 5)
    assert AnnotationExportSensor(task_id="w", config=config).watch()[1:] == ("_SUCCESS", 0)


@pytest.mark.parametrize("event, message", [
    ({"status": "error", "message": "gs://b/x: Forbidden"}, "gs://b/x: Forbidden"),
    ({"status": "success", "exports": []}, "without export paths"),
    ({"status": "timeout"}, "unexpected trigger event"),
    (None, "unexpected trigger event None"),
])
def test_bad_trigger_event_fails_loudly(tmp_path, event, message):
    from airflow.sdk.exceptions import AirflowException

    sensor = AnnotationExportSensor(task_id="wait_for_export", config="unused", deferrable=True)
    with pytest.raises(AirflowException, match="wait_for_export") as info:
        sensor.execute_complete(context={}, event=event)
    assert message in str(info.value)


def test_trigger_reports_storage_errors_as_an_event():
    trigger = AnnotationExportTrigger("s3://bucket/exports", "_SUCCESS", poll_interval=0.1)
    event = asyncio.run(anext(trigger.run()))
    assert event.payload["status"] == "error"
    assert "s3://bucket/exports" in event.payload["message"]
    assert "unsupported" in event.payload["message"]


def test_trigger_serializes_to_its_classpath(tmp_path):
    from airflow.sdk._shared.module_loading import import_string

    trigger = AnnotationExportTrigger(str(tmp_path), None, 3, 0.5, {"x": {"state": "s",
                                                                          "since": 1.0}})
    classpath, kwargs = trigger.serialize()
    assert classpath == "odapi_operators.triggers.AnnotationExportTrigger"
    assert import_string(classpath)(**kwargs).serialize() == (classpath, kwargs)


def test_inactivity_in_reschedule_mode_keeps_the_snapshot(tmp_path, airflow_db, dag_bundle):
    exports = str(tmp_path / "exports")
    export = _write_export(exports, "batch-1", marker=None)
    received = _run_sensor_dag(tmp_path, dag_bundle, _frozen_config(tmp_path, "exports"),
                               marker="", inactivity_seconds=1, mode="reschedule")
    assert received == [export]
