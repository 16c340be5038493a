"""Pre-annotation with real TensorFlow: batched detection, `odapi preannotate` on a local
SavedModel and through TF Serving (the stand-in, REST and gRPC) giving the same tasks, and a
`dag.test()` run of odapi_preannotate on a pushed model. Reuses the session's trained and
exported model (image_bytes input)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from odapi_operators.core.data import sample_data

from conftest import ROOT, odapi

pytestmark = pytest.mark.slow


def _encoded(examples: list[bytes]) -> list[bytes]:
    import tensorflow as tf

    return [tf.train.Example.FromString(e).features.feature["image/encoded"].bytes_list.value[0]
            for e in examples]


@pytest.mark.parametrize("model", ["exported", "checkpoint"])
def test_batched_detections_match_one_image_at_a_time(model, trained_model, exported_model):
    from odapi_operators.core.model.detector import load_detector
    from odapi_operators.core.model.tfvision import val_examples

    path = exported_model if model == "exported" else trained_model["model_dir"]
    detector = load_detector(path)
    assert detector.input_type == ("image_bytes" if model == "exported" else "image_tensor")
    examples = val_examples(trained_model["records"], 4)
    examples = examples + examples[:1] * 2  # same shape thrice: one image_tensor batch
    batched = detector.detect_images(_encoded(examples))
    assert len(batched) == len(examples)
    for example, found in zip(examples, batched):
        single = detector.detect(example)
        assert len(found.scores) == len(single.scores) > 0
        np.testing.assert_allclose(found.scores, single.scores, atol=1e-4)
        np.testing.assert_allclose(found.boxes, single.boxes, atol=1e-4)
        np.testing.assert_array_equal(found.classes, single.classes)


@pytest.fixture(scope="module")
def served(exported_model, tmp_path_factory):
    """The export pushed as version 1 (stable) of `shapes`, and a pool of 6 new images."""
    from odapi_operators.core.serving.promote import promote
    from odapi_operators.core.serving.push import push

    root = tmp_path_factory.mktemp("preannotate")
    promote(root / "serving", "shapes", push(exported_model, root / "serving", "shapes",
                                             "run-1")["version"])
    # seed 12: no two pool images within the near-duplicate distance (seed 11 had a pair at
    # 6 bits, which the ranking by the model's scores then skipped or not)
    sample_data.generate(root / "pool", count=6, seed=12, max_side=128, marker=None)
    return {"root": root, "base": root / "serving", "pool": root / "pool"}


def _cli(served: dict, name: str, model: str, *extra: str) -> tuple[dict, list[dict]]:
    out = served["root"] / name / "batch"  # its own folder: its own sent ledger
    done = odapi("preannotate", "--model", model, "--pool", str(served["pool"]),
                 "--out", str(out), "--score-threshold", "0", "--max-boxes", "5",
                 "--top-k", "4", *extra)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    tasks = [json.loads(line) for line in (out / "tasks.jsonl").read_text().splitlines()]
    return summary, tasks


def _assert_same_tasks(got: list[dict], want: list[dict]) -> None:
    assert [t["meta"]["key"] for t in got] == [t["meta"]["key"] for t in want]
    for g, w in zip(got, want):
        assert g["image"] == w["image"] and g["meta"]["model_version"] == \
            w["meta"]["model_version"]
        assert g["meta"]["score"] == pytest.approx(w["meta"]["score"], abs=1e-4)
        assert [s["label"] for s in g["spans"]] == [s["label"] for s in w["spans"]]
        for a, b in zip(g["spans"], w["spans"]):
            assert np.allclose(a["points"], b["points"], atol=0.05)
            assert a["score"] == pytest.approx(b["score"], abs=1e-3)


def test_cli_local_saved_model_and_tf_serving_give_the_same_tasks(served):
    from support.serving_standin import ServingStandin

    local, tasks = _cli(served, "local", str(served["base"] / "shapes"))
    assert local["model_version"] == "shapes/1" and local["inference"] == "local"
    assert local["images"] == local["scored"] == 6 and local["selected"] == 4
    assert local["skipped"] == {"sent": 0, "labeled": 0, "near_duplicate": 0}
    assert local["images_per_s"] > 0 and len(local["files"]) == 3
    assert all(Path(f).is_file() for f in local["files"])
    assert sum(len(t["spans"]) for t in tasks) == local["boxes"] > 0
    assert all(len(t["spans"]) <= 5 for t in tasks)

    with ServingStandin(served["base"] / "models.config") as standin:
        rest, rest_tasks = _cli(served, "rest", f"{standin.rest_url}/v1/models/shapes",
                                "--serving-dir", str(served["base"] / "shapes"))
        grpc, grpc_tasks = _cli(served, "grpc", f"grpc://{standin.grpc_address}/shapes",
                                "--label-map", str(served["base"] / "shapes" / "1" /
                                                   "assets.extra" / "label_map.pbtxt"))
    assert rest["inference"] == grpc["inference"] == "serving"
    assert rest["model_version"] == grpc["model_version"] == "shapes/1"
    assert ("shapes", 1) in standin.predictions
    _assert_same_tasks(rest_tasks, tasks)
    _assert_same_tasks(grpc_tasks, tasks)


def test_dag_run_preannotates_with_the_pushed_model(served, trained_model, airflow_db,
                                                    dag_bundle, load_dag, monkeypatch):
    """dag.test() syncs the DAG from a bundle holding only it (as test_dag_params does)."""
    from odapi_operators.core.labeling.sent_ledger import SentLedger

    link = dag_bundle / "odapi_preannotate.py"
    if not link.exists():
        link.symlink_to(ROOT / "dags" / "odapi_preannotate.py")

    config = served["root"] / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "home": str(served["root"]), "exports": {"path": "exports"},
        "train": {"model_config": str(ROOT / "include/configs/models/"
                                           "retinanet_mobile_sample.yaml"), "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    monkeypatch.setenv("ODAPI_PIPELINE_CONFIG", str(config))
    dag = load_dag("odapi_preannotate")
    assert dag.params["pool"] == str(served["root"] / "var" / "unlabeled")  # defaults: var/
    out = served["root"] / "preannotations"
    conf = {"pool": str(served["pool"]), "out_dir": str(out), "top_k": 2,
            "score_threshold": 0.0, "format": "labelstudio",
            "candidate": str(trained_model["model_dir"])}
    dag_run = dag.test(run_conf=conf)
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "success", states

    [batch] = [p for p in out.iterdir() if p.is_dir() and p.name != "pool-cache"]
    summary = json.loads((batch / "summary.json").read_text())
    assert summary["model_version"] == "shapes/1" and summary["selected"] == 2
    assert summary["candidate"] == "model"  # the training model dir's name
    tasks = json.loads((batch / "tasks.json").read_text())
    assert [t["predictions"][0]["model_version"] for t in tasks] == ["shapes/1"] * 2
    assert len(SentLedger(out / "sent-shapes.jsonl").records("shapes")) == 2
