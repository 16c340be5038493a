"""odapi_retrain's params: refused with a clear message on the path every trigger takes.

The trigger form, `airflow dags trigger --conf`, the REST API, `backfill create --dag-run-conf`
and `dag.test(run_conf=...)` all reach `SerializedDAG.create_dagrun` (or, for backfills, the
same check in `_validate_backfill_params`): `dag.params.deep_merge(conf).validate()` against
each Param's JSON schema, before a run exists. What a schema cannot express (param
combinations) `check_params` refuses in resolve_config, before anything heavy runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from conftest import ROOT

MODELS = ROOT / "include" / "configs" / "models"
TWO_PROBLEMS = {"force_promote": True, "warm_start": False, "warm_start_steps": 50}


@pytest.fixture()
def retrain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dag_bundle: Path,
            load_dag: Callable[[str], Any]) -> Any:
    """odapi_retrain parsed with a pipeline YAML under tmp_path. dag.test() syncs it to the DB
    from a bundle holding only it, so another DAG file in dags/ cannot break these tests."""
    config = {"home": str(tmp_path), "exports": {"path": "exports"},
              "train": {"model_config": str(MODELS / "retinanet_mobile_sample.yaml"),
                        "steps": 5, "batch_size": 2, "placement": {"pool": None}},
              "serving": {"base": "serving", "model_name": "shapes"}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("ODAPI_PIPELINE_CONFIG", str(path))
    link = dag_bundle / "odapi_retrain.py"
    if not link.exists():
        link.symlink_to(ROOT / "dags" / "odapi_retrain.py")
    return load_dag("odapi_retrain")


def _validate_as_trigger(dag: Any, conf: dict) -> dict:
    """What `create_dagrun` does with a trigger's conf, on the DAG as the server sees it."""
    from airflow.serialization.serialized_objects import DagSerialization

    served = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    return served.params.deep_merge(conf).validate()


def _states(dag_run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


@pytest.mark.parametrize(("conf", "message"), [
    ({"train_steps": 0}, "train_steps: 0 is less than the minimum of 1"),
    ({"train_steps": "ten"}, "train_steps: 'ten' is not of type 'integer'"),
    ({"model_config": str(MODELS / "yolo.yaml")}, f"model_config: '{MODELS}/yolo.yaml' is not "
                                                  "one of ["),
    ({"take_exports": "some"}, "take_exports: 'some' is not one of ['new', 'all']"),
    ({"min_ap50": 1.5}, "min_ap50: 1.5 is greater than the maximum of 1"),
], ids=["steps-zero", "steps-text", "model-unknown", "take-some", "ap50-above-1"])
def test_trigger_refuses_params_outside_their_schema(retrain: Any, conf: dict,
                                                     message: str) -> None:
    from airflow.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="^Invalid input for param ") as refused:
        _validate_as_trigger(retrain, conf)
    assert message in str(refused.value)


def test_dag_test_refuses_a_bad_conf_before_creating_a_run(retrain: Any,
                                                           airflow_db: Path) -> None:
    from airflow.exceptions import ParamValidationError
    from airflow.models.dagrun import DagRun

    before = len(DagRun.find(dag_id=retrain.dag_id))
    with pytest.raises(ParamValidationError, match="train_steps: 0 is less than the minimum"):
        retrain.test(run_conf={"train_steps": 0})
    assert len(DagRun.find(dag_id=retrain.dag_id)) == before


@pytest.mark.parametrize(("conf", "message"), [
    ({"force_promote": True}, "run.force_promote needs run.reason (the force_reason param)"),
    ({"force_promote": True, "force_reason": "  "},
     "run.force_promote needs run.reason (the force_reason param)"),
    ({"warm_start": False, "warm_start_steps": 50},
     "train.warm_start_steps is the budget of a warm start: it needs train.warm_start"),
], ids=["force-no-reason", "force-blank-reason", "budget-without-warm-start"])
def test_schema_valid_combinations_are_refused_by_name(retrain: Any, conf: dict,
                                                       message: str) -> None:
    from odapi_operators.core.config import ConfigError, load_pipeline_config

    params = _validate_as_trigger(retrain, conf)  # each value alone passes the schema
    resolve = retrain.get_task("resolve_config")  # the DAG's own param -> config key map
    overrides = {key: params.get(name) for name, key in resolve.param_keys.items()}
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_pipeline_config(resolve.pipeline_config, overrides)


def test_a_run_with_bad_combinations_fails_at_resolve_config(
        retrain: Any, airflow_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # register_run (trigger rule all_done) is marked done: it still runs after resolve_config
    # failed, fails without a frozen config, and waits retry_delay (1 min) to fail again.
    dag_run = retrain.test(run_conf=TWO_PROBLEMS, mark_success_pattern="register_run")
    states = _states(dag_run)
    assert str(dag_run.state) == "failed", states
    assert states["resolve_config"] == "failed", states
    assert {states[t] for t in ("wait_for_export", "select_exports", "model.train")} == {
        "upstream_failed"}, states
    [resolve] = [ti for ti in dag_run.get_task_instances() if ti.task_id == "resolve_config"]
    assert resolve.try_number == 1, "AirflowFailException must not be retried"
    log = capsys.readouterr().out
    assert "AirflowFailException: " in log and "invalid pipeline config" in log
    assert ("run.force_promote needs run.reason (the force_reason param): it is recorded in "
            "decision.json; train.warm_start_steps is the budget of a warm start: it needs "
            "train.warm_start") in log


def test_valid_params_reach_the_frozen_config(retrain: Any, airflow_db: Path) -> None:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    model = str(MODELS / "retinanet_resnet50_fpn.yaml")
    conf = {"train_steps": 7, "min_ap50": 0.25, "model_config": model, "take_exports": "all",
            "force_promote": True, "force_reason": "hotfix for label drift"}
    assert _validate_as_trigger(retrain, conf)["train_steps"] == 7
    # Only resolve_config runs; the rest is marked done (no export, no training here).
    dag_run = retrain.test(run_conf=conf, mark_success_pattern=r"(?!resolve_config$).*")
    assert _states(dag_run)["resolve_config"] == "success", _states(dag_run)
    with create_session() as session:
        [row] = session.scalars(XComModel.get_many(
            run_id=dag_run.run_id, key="config", dag_ids=retrain.dag_id,
            task_ids="resolve_config")).all()
        frozen = json.loads(Path(XComModel.deserialize_value(row)).read_text())
    assert frozen["train"]["steps"] == 7
    assert frozen["train"]["model_config"] == model
    assert frozen["gate"]["min_ap50"] == 0.25
    assert frozen["train"]["batch_size"] == 2  # no param for it: the YAML's value
