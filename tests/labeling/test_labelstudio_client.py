"""Label Studio pieces that need no server: the labeling config from a label map, the
labelstudio:// exports source, the command line's words, and the provenance of an export
shaped exactly as Label Studio 1.23.2 writes it (the round trip runs against a real server in
test_labelstudio_roundtrip.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from defusedxml import ElementTree

from odapi_operators.core.data import sample_data
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.manifest import read_manifest
from odapi_operators.core.failures import Failure
from odapi_operators.core.labeling.labelstudio_client import (
    LabelStudioError,
    ProjectSource,
    annotation_state,
    labeling_config,
)


def test_labeling_config_labels_every_class_in_id_order():
    config = ElementTree.fromstring(labeling_config({"dog": 2, 'say "cheese" & <go>': 1}))
    image, rectangles = list(config)
    assert (image.tag, image.get("name"), image.get("value")) == ("Image", "image", "$image")
    assert (rectangles.tag, rectangles.get("name"), rectangles.get("toName")) == (
        "RectangleLabels", "label", "image")
    assert [label.get("value") for label in rectangles] == ['say "cheese" & <go>', "dog"]


def test_labeling_config_refuses_an_empty_label_map():
    with pytest.raises(LabelStudioError, match="empty label map") as caught:
        labeling_config({})
    assert caught.value.failure is Failure.CONFIG


@pytest.mark.parametrize("path, expected", [
    ("labelstudio://labelstudio_default/projects/12", ProjectSource("labelstudio_default", 12)),
    ("labelstudio://ls/projects/3/", ProjectSource("ls", 3)),
    ("var/exports", None),
    ("gs://bucket/exports", None)])
def test_exports_path_names_a_project(path, expected):
    assert ProjectSource.parse(path) == expected


@pytest.mark.parametrize("path", ["labelstudio://ls/projects/x", "labelstudio:///projects/3",
                                  "labelstudio://ls/3", "labelstudio://ls/projects/3/tasks"])
def test_a_malformed_project_source_names_the_config_key(path):
    with pytest.raises(LabelStudioError, match=r"exports.path .*projects/<project id>") as caught:
        ProjectSource.parse(path)
    assert caught.value.failure is Failure.CONFIG


def test_annotation_state_changes_with_any_annotation_change():
    task = {"id": 1, "annotations": [{"id": 5, "updated_at": "2026-12-01T08:00:00Z"}]}
    updated = {"id": 1, "annotations": [{"id": 5, "updated_at": "2026-12-01T08:01:00Z"}]}
    cancelled = {"id": 1, "annotations": [{"id": 5, "updated_at": "2026-12-01T08:00:00Z",
                                           "was_cancelled": True}]}
    states = {annotation_state(t) for t in ([task], [updated], [cancelled], [task, {"id": 2}])}
    assert len(states) == 3  # a task without annotations changes nothing
    assert annotation_state([task]) == annotation_state([json.loads(json.dumps(task))])


def _region(label: str, x: float) -> dict:
    return {"id": "r", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": 96, "original_height": 80, "image_rotation": 0,
            "value": {"x": x, "y": 10, "width": 20, "height": 30, "rotation": 0,
                      "rectanglelabels": [label]}}


def _exported_task(task_id: int, image: str, parent: int | None, shown: int) -> dict:
    """A task as Label Studio 1.23.2's JSON export writes it: predictions by id only, and in
    the annotation the prediction shown when it was saved, parent or not."""
    shown_prediction = {"id": shown, "model_version": "shapes/7", "score": 0.2, "task": task_id,
                        "result": [_region("circle", 12)], "created_ago": "0 minutes"}
    return {"id": task_id, "predictions": [shown], "drafts": [], "meta": {},
            "data": {"image": f"/data/local-files/?d={image}", "odapi_key": image[:-4]},
            "annotations": [{"id": task_id + 100, "completed_by": 1, "was_cancelled": False,
                             "ground_truth": False, "created_at": "2026-12-01T07:58:04Z",
                             "updated_at": "2026-12-01T07:58:04Z", "lead_time": 4.2,
                             "result": [_region("square", 40)], "prediction": shown_prediction,
                             "parent_prediction": parent, "parent_annotation": None,
                             "task": task_id, "project": 1}]}


def test_only_an_annotation_made_from_a_prediction_carries_its_model_version(tmp_path):
    """Label Studio inlines the shown prediction in every annotation, also in one drawn from
    scratch (`parent_prediction: null`): that one must not claim the model proposed it."""
    images = tmp_path / "images"
    sample_data.generate(images, count=2, seed=1, max_side=96, marker=None)
    export = tmp_path / "export"
    export.mkdir()
    (export / "project-1.json").write_text(json.dumps([
        _exported_task(1, "shapes_00000.jpg", parent=6, shown=6),
        _exported_task(2, "shapes_00001.jpg", parent=None, shown=7)]))
    ingest([str(export)], tmp_path / "ingest", images_root=str(images))
    records = {r.key: r for r in read_manifest(tmp_path / "ingest" / "manifest.jsonl")}
    assert records["shapes_00000"].provenance["model_version"] == "shapes/7"
    assert "model_version" not in records["shapes_00001"].provenance
    assert [b.label for b in records["shapes_00001"].boxes] == ["square"]


def test_command_line_without_an_address_names_its_flags(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")}
    done = subprocess.run([sys.executable, "-m", "odapi_operators", "labelstudio",
                           "pull-export", "--project", "1", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 3, done.stderr  # a config failure: retrying cannot help
    assert "--url (or $LABEL_STUDIO_URL) and $LABEL_STUDIO_API_KEY, or --conn-id" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("connection, url", [
    ({"host": "http://ls.example:8080/"}, "http://ls.example:8080"),
    ({"host": "ls.example", "port": 8081}, "http://ls.example:8081"),
    ({"host": "ls.example", "schema": "https"}, "https://ls.example")])
def test_hook_reads_the_url_and_token_from_the_connection(monkeypatch, connection, url):
    from odapi_operators.hooks import LabelStudioHook

    monkeypatch.setenv("AIRFLOW_CONN_LABELSTUDIO_DEFAULT", json.dumps(
        {"conn_type": "labelstudio", "password": "tok", **connection}))
    address = LabelStudioHook().address()
    assert (address.url, address.api_key) == (url, "tok")


def test_hook_without_a_token_names_the_connection(monkeypatch):
    from odapi_operators.hooks import LabelStudioHook

    monkeypatch.setenv("AIRFLOW_CONN_LS_NO_TOKEN", json.dumps(
        {"conn_type": "labelstudio", "host": "http://ls:8080"}))
    with pytest.raises(ValueError, match="connection 'ls_no_token': needs host .* password"):
        LabelStudioHook("ls_no_token").address()


def test_labeling_config_command_prints_the_config_of_a_label_map(tmp_path):
    label_map = "item { id: 2 name: 'b' }\nitem { id: 1 name: 'a' }\n"
    (tmp_path / "label_map.pbtxt").write_text(label_map)
    done = subprocess.run([sys.executable, "-m", "odapi_operators", "labelstudio",
                           "labeling-config", "--label-map", str(tmp_path / "label_map.pbtxt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    labels = ElementTree.fromstring(done.stdout).find("RectangleLabels")
    assert [label.get("value") for label in labels] == ["a", "b"]


@pytest.mark.parametrize("content, said", [
    ("{not json", "cannot read tasks"),
    ('{"data": {"image": "a.jpg"}}', "not Label Studio tasks"),
    ('[{"image": "a.jpg"}]', "not Label Studio tasks")])
def test_push_tasks_refuses_a_file_that_is_not_tasks_before_calling_the_server(
        tmp_path, content, said):
    tasks = tmp_path / "tasks.json"
    tasks.write_text(content)
    env = {**os.environ, "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "k"}
    done = subprocess.run([sys.executable, "-m", "odapi_operators", "labelstudio", "push-tasks",
                           str(tmp_path), "--project", "1"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 3, done.stderr
    assert f"{tasks}: {said}" in done.stderr
