"""End to end on the embedded default: `dag.test()` of odapi_retrain (SQLite) on tiny
generated exports with real TensorFlow; continuous training over two exports that land at
different times (incremental mode).

The first export also holds bad records (an XML that is not VOC, a file that is not an
image): the run must report them, train and evaluate on the good ones, and have the gate
decide. The gate holds candidates to an AP50 of 1.0, so they are rejected: export and push
are skipped, the not-promoted notice and the registry record still happen. Then a model goes
into production (the session's exported model) and a second export lands: run 2's dataset
version is the union, its records hold both exports' images, it starts from the production
model, and candidate and production are compared on the `all`, `new` and `old` slices with
bootstrap intervals. (Promotion, export and push are proven on the production cluster by
test_backfill.py.)
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from odapi_operators.core.data.sample_data import generate, voc_xml

from conftest import ROOT, odapi, tiny_model_config
from support.fakes import asset_events as _asset_events

pytestmark = pytest.mark.slow


def _load_dag():
    spec = importlib.util.spec_from_file_location("odapi_retrain_e2e",
                                                  ROOT / "dags" / "odapi_retrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


@pytest.fixture()
def pipeline(tmp_path, monkeypatch):
    export = tmp_path / "exports" / "batch-1"
    generate(export, count=24, seed=3, max_side=128)
    (export / "notes.xml").write_text("<html><body>not an annotation</body></html>")
    (export / "broken.jpg").write_bytes(b"<html>502 Bad Gateway</html>")
    (export / "broken.xml").write_text(voc_xml("broken.jpg", "/x/broken.jpg", 100, 100, []))
    config = {
        "home": str(tmp_path),
        "exports": {"path": "exports"},
        # the session's exported model serves in run 2, which warm-starts from it
        "train": {"model_config": str(tiny_model_config(tmp_path / "models")), "steps": 10,
                  "batch_size": 4},
        # the second export is small; the gate refuses every candidate here, so an export
        # ahead would be spent for nothing (test_backfill.py's promotions use it)
        "evaluate": {"missing_classes": "warn", "export_ahead": False},
        "gate": {"min_ap50": 1.0},  # no 10-step model reaches it
        "serving": {"base": "serving", "model_name": "shapes"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("ODAPI_PIPELINE_CONFIG", str(path))
    return tmp_path


def _task_states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def test_retrain_reports_bad_records_trains_and_gates(pipeline, airflow_db, exported_model):
    dag_run = _load_dag().test()
    states = _task_states(dag_run)
    assert str(dag_run.state) == "success", states

    run_dir = next((pipeline / "var" / "runs").iterdir())
    metrics = json.loads((run_dir / "evaluate" / "candidate" / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "ARmax100"} <= set(metrics)
    assert set(metrics["per_class"]) == {"circle", "square", "triangle"}
    assert states["model.evaluate_production"] == "success"  # nothing served: version None
    assert not (run_dir / "evaluate" / "production").exists()
    report = run_dir / "report" / "report.html"
    assert report.is_file() and "no production model" in report.read_text()
    decision = json.loads((run_dir / "gate" / "decision.json").read_text())
    assert decision["promoted"] is False and decision["first_model"] is True
    assert decision["checks"][0]["metric"] == "AP50" and "AP50" in decision["reason"]
    for task, state in {"promote.export": "skipped", "promote.push": "skipped",
                        "promote.not_promoted": "success", "register_run": "success"}.items():
        assert states[task] == state, (task, states)
    assert not (pipeline / "serving" / "shapes" / "1").exists()

    rejections = (run_dir / "ingest" / "rejections.jsonl").read_text()
    assert "notes.xml" in rejections and "not a Pascal VOC annotation" in rejections
    quarantine = (run_dir / "verify" / "quarantine.jsonl").read_text()
    assert "broken" in quarantine and "not a readable image" in quarantine
    assert json.loads((run_dir / "ingest" / "summary.json").read_text())["images"] == 25

    from odapi_operators.core.serving.registry import read as read_registry

    [record] = [r for r in read_registry(pipeline / "serving" / "registry.jsonl", "shapes")
                if r.get("run_id") == dag_run.run_id and r.get("kind") == "candidate"]
    assert record.get("version") is None and record["decision"]["promoted"] is False

    events = _asset_events(dag_run.run_id)
    ingest_summary = json.loads((run_dir / "ingest" / "summary.json").read_text())
    assert events["prepare.ingest"]["fingerprint"] == ingest_summary["fingerprint"]
    assert events["prepare.ingest"]["new_version"] is True
    assert "promote.push" not in events
    datasets = pipeline / "var" / "datasets"
    assert (datasets / ingest_summary["fingerprint"] / "manifest.jsonl").is_file()

    # A model serves; a second export of other images lands: run 2 learns from both.
    odapi("push", "--saved-model", str(exported_model), "--base", str(pipeline / "serving"),
          "--model-name", "shapes", "--out", str(pipeline / "push-1"))
    generate(pipeline / "exports" / "batch-2", count=12, seed=4, max_side=128, prefix="second")
    second = _load_dag().test()
    second_states = _task_states(second)
    assert str(second.state) == "success", second_states
    run2 = next(d for d in (pipeline / "var" / "runs").iterdir() if d != run_dir)
    version = json.loads((run2 / "ingest" / "summary.json").read_text())
    diff = json.loads((run2 / "ingest" / "diff.json").read_text())
    assert diff["parent"] == ingest_summary["fingerprint"]
    assert len(diff["added"]) == 12 and all(k.startswith("second_") for k in diff["added"])
    assert diff["changed"] == [] and diff["removed"] == []
    assert version["images"] == 25 + 12
    keys = {e["key"] for e in json.loads(
        (run2 / "records" / "source_ids.json").read_text()).values()}
    assert any(k.startswith("shapes_") for k in keys) and any(k.startswith("second_")
                                                              for k in keys)
    train_summary = json.loads((run2 / "train" / "summary.json").read_text())
    assert train_summary["start"]["reason"] == "warm start from version 1"
    decision = json.loads((run2 / "gate" / "decision.json").read_text())
    assert set(decision["slices"]) == {"all", "new", "old"}
    for name, compared in decision["slices"].items():
        assert compared["images"] > 0, name
        lo, hi = compared["AP50"]["interval"]
        assert lo <= compared["AP50"]["delta"] <= hi, (name, compared)
    [old_guard] = [c for c in decision["checks"] if c.get("check") == "slice:old:AP50"]
    assert old_guard["verdict"] in ("pass", "fail") and old_guard["interval"]
    candidate = json.loads((run2 / "evaluate" / "candidate" / "metrics.json").read_text())
    assert candidate["slices"]["new"]["images"] + candidate["slices"]["old"]["images"] \
        == candidate["slices"]["all"]["images"]

    again = _load_dag().test()  # nothing new landed: the run skips instead of retraining
    again_states = _task_states(again)
    assert str(again.state) == "success", again_states
    assert again_states["select_exports"] == "skipped"
    assert again_states["model.train"] == "skipped"
