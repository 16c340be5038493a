"""AnnotationExportSensor with a Label Studio project as its source, against a real Label
Studio: it pulls an export folder when the project's annotations changed, and the pipeline
ingests that folder like any export."""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import pytest
import yaml

from odapi_operators.core.config import freeze_config, load_pipeline_config
from odapi_operators.core.data import sample_data
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.ledger import select_exports
from odapi_operators.core.data.manifest import read_manifest
from odapi_operators.core.labeling.annotation_tasks import (
    Proposal,
    labelstudio_image,
    labelstudio_task,
)
from odapi_operators.core.labeling.labelstudio_client import (
    PULL_FILE,
    Address,
    LabelStudioClient,
    labeling_config,
)
from odapi_operators.sensors import AnnotationExportSensor

pytestmark = [pytest.mark.slow, pytest.mark.labelstudio, pytest.mark.timeout(600)]

_DAG_FILE = """
import json
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, task

from odapi_operators.sensors import AnnotationExportSensor

with DAG({dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1)) as dag:
    wait = AnnotationExportSensor(task_id="wait", config={config!r}, poke_interval=0.2,
                                  timeout=60, mode="reschedule")

    @task
    def record(exports):
        Path({received!r}).write_text(json.dumps(exports))

    record(wait.output)
"""


def _sensor_dag_returns(bundle: Path, tmp_path: Path, config: str) -> list[str]:
    """dag.test() of the sensor >> a task recording its XCom; what that task received."""
    dag_id = f"test_labelstudio_sensor_{uuid.uuid4().hex[:8]}"
    received = tmp_path / f"{dag_id}.json"
    dag_file = bundle / f"{dag_id}.py"
    dag_file.write_text(_DAG_FILE.format(dag_id=dag_id, config=config,
                                         received=str(received)))
    spec = importlib.util.spec_from_file_location(dag_id, dag_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag_run = module.dag.test()
    assert str(dag_run.state) == "success", [(t.task_id, t.state) for t in
                                             dag_run.get_task_instances()]
    return json.loads(received.read_text())


def _annotate(label_studio, task: dict, label: str, x: float) -> tuple:
    """An annotator's box (percent of the image) on `task`; the normalized box it means."""
    region = {**task["predictions"][0]["result"][0], "value": {
        "x": x, "y": 10.0, "width": 30.0, "height": 40.0, "rotation": 0,
        "rectanglelabels": [label]}}
    region.pop("score", None)
    label_studio.annotator("annotate", {"annotations": [{"task": task["id"],
                                                         "result": [region]}]})
    return (label, x / 100, 0.1, (x + 30) / 100, 0.5)


def test_sensor_pulls_a_project_when_its_annotations_change(
        label_studio, airflow_db, dag_bundle, tmp_path, monkeypatch):
    images = Path(label_studio.files_root) / f"sensor-{tmp_path.name}"
    sample_data.generate(images, count=2, seed=4, max_side=96, marker=None)
    client = LabelStudioClient(Address(label_studio.url, label_studio.token))
    project = client.create_project("odapi sensor", labeling_config({"circle": 1, "square": 2}))
    client.import_tasks(project["id"], [
        labelstudio_task(labelstudio_image(f"{images.name}/{name}", local=True), 96, 80,
                         [Proposal("circle", 0.9, 0.1, 0.1, 0.4, 0.5)], "shapes/2", 0.5,
                         meta={"key": Path(name).stem})
        for name in ("shapes_00000.jpg", "shapes_00001.jpg")])
    monkeypatch.setenv("AIRFLOW_CONN_LABELSTUDIO_TEST", json.dumps(
        {"conn_type": "labelstudio", "host": label_studio.url, "password": label_studio.token}))
    pulls = tmp_path / "pulls"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "home": str(tmp_path), "train": {"model_config": "unused.yaml", "steps": 1},
        "serving": {"base": "serving", "model_name": "m"},
        "exports": {"path": f"labelstudio://labelstudio_test/projects/{project['id']}",
                    "labelstudio_pulls": "pulls"}}))
    config = freeze_config(load_pipeline_config(pipeline), tmp_path / "frozen")
    sensor = AnnotationExportSensor(task_id="wait", config=config)

    assert not sensor.poke({}).is_done  # tasks, but nothing annotated: nothing to pull
    assert not pulls.exists()

    tasks = sorted(label_studio.annotator("tasks", {"project": project["id"]}),
                   key=lambda t: t["data"]["odapi_key"])
    first = _annotate(label_studio, tasks[0], "square", 20.0)
    [pulled] = _sensor_dag_returns(dag_bundle, tmp_path, config)
    assert Path(pulled).parent == pulls and (Path(pulled) / "_SUCCESS").exists()
    assert select_exports(tmp_path / "ledger.jsonl", "run-1", [pulled], marker="_SUCCESS") == [
        pulled]  # what the DAG's select_exports takes
    ingest([pulled], tmp_path / "ingest", images_root=str(images))
    [record] = read_manifest(tmp_path / "ingest" / "manifest.jsonl")
    assert record.key == "shapes_00000"
    box = record.boxes[0]
    assert (box.label, *[round(v, 6) for v in (box.xmin, box.ymin, box.xmax, box.ymax)]) == first

    again = sensor.poke({})  # no change: the same pull, no new one
    assert again.xcom_value == [pulled] and len(list(pulls.iterdir())) == 1

    _annotate(label_studio, tasks[1], "circle", 50.0)
    newer = sensor.poke({}).xcom_value
    assert newer != [pulled] and len(list(pulls.iterdir())) == 2
    assert json.loads((Path(newer[0]) / PULL_FILE).read_text())["annotations"] == 2
