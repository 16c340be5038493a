"""odapi_rollback: `dag.test()` moves `stable` back once Serving (the stand-in) answers with the
target version, and records the reason; a run without a reason never starts."""

from __future__ import annotations

import json

import pytest
import yaml

from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving import registry

from conftest import ROOT
from support.fakes import asset_events as _asset_events


@pytest.fixture()
def pipeline(tmp_path, monkeypatch):
    """A pipeline config whose serving base is tmp_path/serving (model `shapes`)."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "home": str(tmp_path), "exports": {"path": "exports"},
        "train": {"model_config": str(ROOT / "include/configs/models/"
                                           "retinanet_mobile_sample.yaml"), "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes", "wait_available_s": 300}}))
    monkeypatch.setenv("ODAPI_PIPELINE_CONFIG", str(path))
    return tmp_path / "serving"


@pytest.fixture()
def rollback_dag(pipeline, dag_bundle, load_dag):
    """odapi_rollback parsed with that config; dag.test() syncs it from a bundle holding only
    it, so another DAG file in dags/ cannot break these tests."""
    link = dag_bundle / "odapi_rollback.py"
    if not link.exists():
        link.symlink_to(ROOT / "dags" / "odapi_rollback.py")
    return load_dag("odapi_rollback")


def _stable(serving) -> int | None:
    config = serving_config.read(serving / "models.config")
    return serving_config.labels(serving_config.entry(config, "shapes")).get("stable")


@pytest.mark.slow
def test_rollback_waits_for_serving_then_moves_stable_back(pipeline, rollback_dag,
                                                           exported_model, airflow_db,
                                                           monkeypatch):
    from odapi_operators.core.serving.promote import promote
    from odapi_operators.core.serving.push import push

    from support.serving_standin import ServingStandin

    for run in ("run-1", "run-2"):
        promote(pipeline, "shapes", push(exported_model, pipeline, "shapes", run)["version"],
                reason=f"promoted by {run}")
    assert _stable(pipeline) == 2
    with ServingStandin(pipeline / "models.config", load_delay_s=0.5) as standin:
        host, port = standin.grpc_address.split(":")
        monkeypatch.setenv("AIRFLOW_CONN_TF_SERVING_DEFAULT", json.dumps(
            {"conn_type": "tf_serving", "host": host, "port": int(port),
             "extra": {"rest_url": standin.rest_url, "timeout": 60}}))
        dag_run = rollback_dag.test(run_conf={"reason": "misses boxes at night"})
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "success", states

    assert _stable(pipeline) == 1
    assert ("shapes", 1) in standin.predictions  # confirmed live before the label moved
    assert serving_config.labels(standin.reloads[-1].model_config_list.config[0]) == {
        "stable": 1}  # and Serving was handed the final config
    [move] = [r for r in registry.read(pipeline / "registry.jsonl", "shapes")
              if r.get("action") == "rollback"]
    assert move["version"] == 1 and move["previous"] == 2
    assert move["reason"] == "misses boxes at night"
    assert _asset_events(dag_run.run_id)["rollback"] == {
        "model_name": "shapes", "version": 1, "path": f"{pipeline}/shapes/1",
        "action": "rollback"}


@pytest.mark.parametrize("conf", [{}, {"reason": ""}, {"reason": "  "}],
                         ids=["missing", "empty", "blank"])
def test_a_rollback_without_reason_is_refused(pipeline, rollback_dag, airflow_db, conf):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError, match="Invalid input for param reason"):
        rollback_dag.test(run_conf=conf)
    assert not pipeline.exists()
