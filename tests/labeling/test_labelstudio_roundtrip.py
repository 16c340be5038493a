"""The Label Studio round trip against a real Label Studio (tests/support/label_studio.py):

    sample images -> preannotate (a stand-in model proposing perturbed truth) -> tasks.json
    -> `odapi labelstudio push-tasks --create --label-map` -> an annotator (label-studio-sdk)
    accepts some predictions and corrects others -> `odapi labelstudio pull-export` (JSON,
    JSON-MIN) -> ingest: the boxes are what was submitted, with the proposing model version.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from odapi_operators.core.data import sample_data
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.label_map import format_label_map
from odapi_operators.core.data.manifest import read_manifest
from odapi_operators.core.labeling.preannotate import PreannotateOptions, preannotate
from odapi_operators.core.labeling.predictors import ModelRef
from odapi_operators.core.model.detector import Detections

from conftest import odapi

pytestmark = [pytest.mark.slow, pytest.mark.labelstudio, pytest.mark.timeout(900)]

LABELS = {"circle": 1, "square": 2, "triangle": 3}
SHIFT = 0.02  # the stand-in model's boxes are the truth moved right by this much


@dataclass
class PerturbedTruth:
    """A 'model' proposing each image's true boxes moved right by SHIFT (by image sha256)."""

    table: dict[str, Detections]
    ref: ModelRef

    def predict(self, images: list[bytes]) -> list[Detections]:
        return [self.table[hashlib.sha256(image).hexdigest()] for image in images]


def perturbed_truth(images: Path, truth: dict, label_map: Path) -> PerturbedTruth:
    table = {}
    for key, record in truth.items():
        boxes = [[b.ymin, min(b.xmin + SHIFT, 0.9), b.ymax, min(b.xmax + SHIFT, 1.0)]
                 for b in record.boxes]
        table[hashlib.sha256((images / f"{key}.jpg").read_bytes()).hexdigest()] = Detections(
            np.array(boxes).reshape(-1, 4), np.full(len(boxes), 0.8),
            np.array([LABELS[b.label] for b in record.boxes]))
    return PerturbedTruth(table, ModelRef("shapes", 7, label_map=str(label_map)))


def corrected(task: dict, edit: str) -> tuple[list[dict], int | None]:
    """What the annotator submits for `task`: (result, the prediction it started from)."""
    prediction = task["predictions"][0]
    result = copy.deepcopy(prediction["result"])
    for region in result:
        region.pop("score", None)  # an annotation's regions carry no model score
    if edit == "moved":
        result[0]["value"]["x"] -= 100 * SHIFT
    elif edit == "relabeled":
        label = result[0]["value"]["rectanglelabels"][0]
        result[0]["value"]["rectanglelabels"] = [next(n for n in LABELS if n != label)]
    elif edit == "deleted":
        result = result[:-1]
    elif edit == "added":
        result.append({**copy.deepcopy(result[0]), "id": "added", "value": {
            "x": 1.5, "y": 2.25, "width": 10.125, "height": 12.5, "rotation": 0,
            "rectanglelabels": ["circle"]}})
    elif edit == "from scratch":
        return [{**result[0], "value": {"x": 50, "y": 40, "width": 20, "height": 30,
                                        "rotation": 0, "rectanglelabels": ["square"]}}], None
    return result, prediction["id"]


def boxes_of(result: list[dict]) -> list[tuple]:
    """The normalized boxes a submitted result stands for, sorted."""
    return sorted((r["value"]["rectanglelabels"][0], r["value"]["x"] / 100,
                   r["value"]["y"] / 100, (r["value"]["x"] + r["value"]["width"]) / 100,
                   (r["value"]["y"] + r["value"]["height"]) / 100) for r in result)


def ingested(export: Path, images_root: Path, out: Path) -> dict:
    ingest([str(export)], out, images_root=str(images_root))
    return {r.key: r for r in read_manifest(out / "manifest.jsonl")}


def assert_boxes(records: dict, submitted: dict) -> None:
    assert set(records) == set(submitted)  # the task nobody annotated is not a record
    for key, expected in submitted.items():
        got = sorted((b.label, b.xmin, b.ymin, b.xmax, b.ymax) for b in records[key].boxes)
        assert [g[0] for g in got] == [e[0] for e in expected], key
        assert np.allclose([g[1:] for g in got], [e[1:] for e in expected], atol=1e-6), key


EDITS = ["accepted", "moved", "relabeled", "deleted", "added", "from scratch"]


@pytest.fixture(scope="module")
def annotated_project(label_studio, tmp_path_factory) -> dict:
    """A project made by `odapi labelstudio push-tasks` from a preannotate batch, with one
    task per EDITS annotated through label-studio-sdk and one left unannotated."""
    root = tmp_path_factory.mktemp("round-trip")
    images = Path(label_studio.files_root) / root.name  # Label Studio serves it
    sample_data.generate(images, count=len(EDITS) + 1, seed=11, max_side=96, marker=None)
    ingest([str(images)], root / "truth")
    truth = {r.key: r for r in read_manifest(root / "truth" / "manifest.jsonl")}
    label_map = root / "label_map.pbtxt"
    label_map.write_text(format_label_map(LABELS))
    model = perturbed_truth(images, truth, label_map)
    batch = root / "batch"
    preannotate(str(images), batch, model, options=PreannotateOptions(fmt="labelstudio"))

    env = {"LABEL_STUDIO_API_KEY": label_studio.token}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        pushed = json.loads(odapi("labelstudio", "push-tasks", str(batch), "--create",
                                  "odapi round trip", "--label-map", str(label_map),
                                  "--url", label_studio.url).stdout)
    assert (pushed["tasks"], pushed["imported"]) == (len(truth), len(truth))
    assert pushed["model_versions"] == ["shapes/7"]

    tasks = sorted(label_studio.annotator("tasks", {"project": pushed["project"]}),
                   key=lambda t: t["data"]["odapi_key"])
    # the one with the most boxes loses one; the last one nobody annotates
    tasks.sort(key=lambda t: -len(t["predictions"][0]["result"]))
    submitted, from_prediction, annotations = {}, set(), []
    for task, edit in zip(tasks, ["deleted"] + [e for e in EDITS if e != "deleted"]):
        result, parent = corrected(task, edit)
        annotations.append({"task": task["id"], "result": result, "parent_prediction": parent})
        submitted[task["data"]["odapi_key"]] = boxes_of(result)
        if parent is not None:
            from_prediction.add(task["data"]["odapi_key"])
    label_studio.annotator("annotate", {"annotations": annotations})
    return {"project": pushed["project"], "images": images, "submitted": submitted,
            "from_prediction": from_prediction, "root": root}


def pull(label_studio, project: int, out: Path, export_type: str) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABEL_STUDIO_URL", label_studio.url)
        patch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
        return json.loads(odapi("labelstudio", "pull-export", "--project", str(project),
                                "--out", str(out), "--export-type", export_type).stdout)


def test_json_export_ingests_to_the_submitted_boxes_with_the_model_version(
        label_studio, annotated_project):
    project = annotated_project
    out = project["root"] / "export-json"
    pulled = pull(label_studio, project["project"], out, "JSON")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["_SUCCESS", "labelstudio.json", Path(pulled["file"]).name])
    assert pulled["annotations"] == len(project["submitted"])

    records = ingested(out, project["images"], project["root"] / "ingest-json")
    assert_boxes(records, project["submitted"])
    versions = {key: r.provenance.get("model_version") for key, r in records.items()}
    assert versions == {key: "shapes/7" if key in project["from_prediction"] else None
                        for key in project["submitted"]}


@pytest.fixture(scope="module")
def json_min_export(label_studio, annotated_project) -> tuple[Path, dict]:
    out = annotated_project["root"] / "export-min"
    return out, pull(label_studio, annotated_project["project"], out, "JSON_MIN")


def test_json_min_export_is_pulled(annotated_project, json_min_export):
    out, pulled = json_min_export
    assert (out / "_SUCCESS").exists() and pulled["export_type"] == "JSON_MIN"
    tasks = json.loads(Path(pulled["file"]).read_text())
    assert sorted(t["odapi_key"] for t in tasks) == sorted(annotated_project["submitted"])


def test_json_min_export_ingests_to_the_submitted_boxes(annotated_project, json_min_export):
    out, _ = json_min_export
    records = ingested(out, annotated_project["images"], annotated_project["root"] / "ingest-min")
    assert_boxes(records, annotated_project["submitted"])


@pytest.mark.parametrize("token, project, said", [
    ("not-a-token", 1, "HTTP 401"), (None, 999, "HTTP 404")], ids=["bad token", "no project"])
def test_a_refused_pull_is_a_config_failure_and_writes_nothing(label_studio, tmp_path, token,
                                                                project, said):
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": token or label_studio.token}
    done = subprocess.run([sys.executable, "-m", "odapi_operators", "labelstudio",
                           "pull-export", "--project", str(project), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode == 3, done.stderr  # retrying cannot help
    assert f"{label_studio.url}/api/projects/{project}/export: {said}" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_personal_access_token_works_as_the_api_key(label_studio, annotated_project,
                                                      tmp_path):
    """Label Studio's newer tokens are JWT refresh tokens, exchanged for an access token."""
    import requests

    created = requests.post(f"{label_studio.url}/api/token/", timeout=30,
                            headers={"Authorization": f"Token {label_studio.token}"})
    created.raise_for_status()
    token = created.json()["token"]
    assert token.count(".") == 2  # a JWT, not a legacy key
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": token}
    done = subprocess.run([sys.executable, "-m", "odapi_operators", "labelstudio",
                           "pull-export", "--project", str(annotated_project["project"]),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["annotations"] == len(annotated_project["submitted"])


def test_pull_export_reads_the_server_from_an_airflow_connection(label_studio, annotated_project,
                                                                 tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    env["AIRFLOW_CONN_LS_TEAM"] = json.dumps({"conn_type": "labelstudio", "host": label_studio.url,
                                              "password": label_studio.token})
    done = subprocess.run([sys.executable, "-m", "odapi_operators", "labelstudio",
                           "pull-export", "--conn-id", "ls_team", "--project",
                           str(annotated_project["project"]), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["url"] == label_studio.url
    assert (tmp_path / "out" / "_SUCCESS").exists()
