"""`promote.approval`: a real `dag.test()` run waits in the approval task (awaiting_input: no
worker slot) until a person answers through Airflow's own REST API (the installed
api_fastapi app, served on 127.0.0.1), then takes the chosen branch and records who and why;
no answer in time is a Reject (the scheduler's timeout sweep); `force_promote` does not wait.
odapi_retrain wires the approval (and the canary check) only when asked for.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
import yaml

from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving import registry

from conftest import ROOT, free_port
from support.fakes import fake_saved_model

DAG_ID = "odapi_approval_under_test"
APPROVE = "promote.approve"
WAIT_S = 120


@pytest.fixture()
def promote_dir(tmp_path, monkeypatch) -> Path:
    """A pipeline with approval on, a passing candidate's metrics, a report and a SavedModel
    folder to push (push only copies it: no TensorFlow needed)."""
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({
        "home": str(tmp_path), "exports": {"path": "exports"},
        "train": {"model_config": str(ROOT / "include/configs/models/"
                                           "retinanet_mobile_sample.yaml"), "steps": 1},
        "gate": {"min_ap50": 0.5},
        "serving": {"base": "serving", "model_name": "shapes"},
        "promote": {"approval": True}}))
    (tmp_path / "metrics.json").write_text(json.dumps({"AP": 0.41, "AP50": 0.72,
                                                       "eval_images": 12}))
    (tmp_path / "report.html").write_text("<html>report</html>")
    fake_saved_model(tmp_path / "saved_model", "candidate")
    monkeypatch.setenv("ODAPI_PIPELINE_CONFIG", str(tmp_path / "pipeline.yaml"))
    return tmp_path


@pytest.fixture()
def approval_dag(promote_dir, dag_bundle) -> Callable[[float], Any]:
    """The test DAG (tests/support/approval_dag.py) parsed with an answer timeout in hours."""
    import importlib.util

    link = dag_bundle / "approval_dag.py"
    if not link.exists():
        link.symlink_to(ROOT / "tests" / "support" / "approval_dag.py")

    def load(hours: float = 1.0):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("ODAPI_TEST_APPROVAL_HOURS", str(hours))
            spec = importlib.util.spec_from_file_location("approval_dag_under_test", link)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        return module.dag

    return load


@pytest.fixture(scope="module")
def airflow_api(airflow_db, tmp_path_factory):
    """Airflow's REST API (api_fastapi, `core` app) on 127.0.0.1 over the tests' metadata DB,
    in a thread of this process; a signed-in session of user `reviewer` (SimpleAuthManager)."""
    import uvicorn

    passwords = tmp_path_factory.mktemp("auth") / "passwords.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "reviewer:admin")
        patch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
        from airflow.api_fastapi.app import create_app

        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app("core"), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        _until(lambda: _answers(f"{base}/api/v2/monitor/health"), "the API to answer")
        token = requests.post(f"{base}/auth/token", timeout=30, json={
            "username": "reviewer",
            "password": json.loads(passwords.read_text())["reviewer"]}).json()["access_token"]
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        try:
            yield base, session
        finally:
            server.should_exit = True
            thread.join(30)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).ok
    except requests.RequestException:
        return False


def _until(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)
    return found


def _waiting(base: str, session: requests.Session) -> dict | None:
    """The approval request of the running test DAG, once its task is awaiting input."""
    found = session.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/~/hitlDetails",
                        params={"response_received": "false"}, timeout=30).json()
    return next((d for d in found["hitl_details"]
                 if d["task_instance"]["state"] == "awaiting_input"), None)


def _in_background(work: Callable[[], Any]) -> dict:
    """Run `work` beside dag.test() (which blocks this thread); its result or error."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # re-raised by the test after dag.test() returns
            outcome["error"] = exc

    threading.Thread(target=run, daemon=True).start()
    return outcome


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def _labels(promote_dir: Path) -> dict[str, int]:
    config = serving_config.read(promote_dir / "serving" / "models.config")
    return serving_config.labels(serving_config.entry(config, "shapes"))


def _decision(dag_run, promote_dir: Path) -> dict:
    from odapi_operators.core.layout import RunFile, RunLayout

    layout = RunLayout(promote_dir / "var" / "runs", dag_run.run_id)
    return json.loads(layout.file(RunFile.DECISION).read_text())


@pytest.mark.slow
def test_an_approver_answers_through_the_api_and_the_run_takes_the_chosen_branch(
        approval_dag, airflow_api, promote_dir):
    base, session = airflow_api
    dag = approval_dag()

    def answer() -> dict:
        request = _until(lambda: _waiting(base, session), "the approval request")
        ti = request["task_instance"]
        response = session.patch(
            f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{ti['dag_run_id']}/taskInstances/"
            f"{APPROVE}/-1/hitlDetails", timeout=30,
            json={"chosen_options": ["Serve as canary only"],
                  "params_input": {"comment": "looks right on the night shots"}})
        assert response.status_code == 200, response.text
        return request

    answered = _in_background(answer)
    dag_run = dag.test()
    if "error" in answered:
        raise answered["error"]
    request = answered["result"]

    # What the approver was shown, while the task held no worker slot.
    assert request["task_instance"]["state"] == "awaiting_input"
    assert request["options"] == ["Promote to stable", "Serve as canary only", "Reject"]
    assert request["defaults"] == ["Reject"]
    assert "**The gate passed** (rule `first_model`)" in request["body"]
    assert "| AP50 >= 0.5 | 0.720 |" in request["body"]
    assert str(promote_dir / "report.html") in request["body"]

    states = _states(dag_run)
    assert str(dag_run.state) == "success", states
    assert states[APPROVE] == "success" and states["promote.push"] == "success"
    assert states["promote.rejected_by_approver"] == "skipped"
    assert _labels(promote_dir) == {"canary": 1}  # served as canary only: no stable

    approval = _decision(dag_run, promote_dir)["approval"]
    assert {k: approval[k] for k in ("choice", "by", "comment", "via")} == {
        "choice": "canary", "by": "reviewer", "comment": "looks right on the night shots",
        "via": "approver"}
    records = registry.read(promote_dir / "serving" / "registry.jsonl", "shapes")
    [move] = [r for r in records if r["kind"] == "label"]
    assert (move["label"], move["version"], move["by"]) == ("canary", 1, "reviewer")
    assert "looks right on the night shots" in move["reason"]
    [candidate] = registry.candidates(records)
    assert candidate["decision"]["approval"]["by"] == "reviewer"
    assert registry.rows([candidate])[0]["decision"] == "canary only"


@pytest.mark.slow
def test_no_answer_in_time_rejects_and_nothing_is_pushed(approval_dag, airflow_db,
                                                         promote_dir):
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    dag = approval_dag(hours=1 / 3600)  # one second

    def sweep() -> None:  # what the scheduler does each loop, here until it resolved it
        runner = SchedulerJobRunner(job=Job())

        def timed_out() -> bool:
            runner.check_awaiting_input_timeouts()
            return (promote_dir / "var").exists() and any(
                "approval" in json.loads(p.read_text())
                for p in (promote_dir / "var" / "runs").glob("*/gate/decision.json"))

        _until(timed_out, "the timeout sweep to answer Reject")

    swept = _in_background(sweep)
    dag_run = dag.test()
    if "error" in swept:
        raise swept["error"]

    states = _states(dag_run)
    assert states[APPROVE] == "success", states
    assert states["promote.rejected_by_approver"] == "success"
    assert states["promote.push"] == "skipped"
    assert not (promote_dir / "serving" / "models.config").exists()
    approval = _decision(dag_run, promote_dir)["approval"]
    assert (approval["choice"], approval["via"], approval["by"]) == ("reject", "timeout", None)
    [candidate] = registry.candidates(registry.read(promote_dir / "serving" / "registry.jsonl"))
    assert registry.rows([candidate])[0]["decision"] == "approver rejected"


@pytest.mark.slow
def test_force_promote_is_recorded_as_the_approval_and_does_not_wait(approval_dag, airflow_db,
                                                                     promote_dir):
    dag_run = approval_dag().test(run_conf={"force_promote": True,
                                            "force_reason": "hotfix for the night camera"})
    states = _states(dag_run)
    assert str(dag_run.state) == "success", states
    assert states[APPROVE] == "success" and states["promote.push"] == "success"
    assert _labels(promote_dir) == {"stable": 1}
    approval = _decision(dag_run, promote_dir)["approval"]
    assert (approval["choice"], approval["via"], approval["comment"], approval["by"]) == (
        "stable", "force_promote", "hotfix for the night camera", "dag_test")
    [move] = [r for r in registry.read(promote_dir / "serving" / "registry.jsonl")
              if r["kind"] == "label"]
    assert move["by"] == "dag_test" and "hotfix for the night camera" in move["reason"]


def _retrain(monkeypatch, tmp_path: Path, promote: dict | None):
    import importlib.util

    config = yaml.safe_load((ROOT / "include/configs/pipeline.yaml").read_text())
    config["home"] = str(ROOT)
    if promote is not None:
        config["promote"] = promote
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("ODAPI_PIPELINE_CONFIG", str(tmp_path / "pipeline.yaml"))
    spec = importlib.util.spec_from_file_location("odapi_retrain_promote", ROOT / "dags" /
                                                  "odapi_retrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


def test_odapi_retrain_asks_and_checks_the_canary_only_when_configured(monkeypatch, tmp_path):
    from odapi_operators.approval import ApprovePromotionOperator
    from odapi_operators.operators import StageOperator

    default = _retrain(monkeypatch, tmp_path, None)
    assert not {"promote.approve", "promote.rejected_by_approver",
                "promote.canary_check"} & set(default.task_dict)
    assert default.task_dict["register_run"].upstream_task_ids == {
        "promote.gate", "promote.report", "promote.push", "resolve_config"}

    dag = _retrain(monkeypatch, tmp_path, {"approval": True, "approval_timeout_hours": 6,
                                           "canary": True})
    approve = dag.task_dict[APPROVE]
    assert isinstance(approve, ApprovePromotionOperator)
    assert approve.upstream_task_ids == {"promote.if_promoted", "promote.gate",
                                         "promote.report"}
    assert approve.options_mapping == {"Promote to stable": "promote.push",
                                       "Serve as canary only": "promote.push",
                                       "Reject": "promote.rejected_by_approver"}
    assert approve.defaults == ["Reject"] and approve.response_timeout.total_seconds() == 6 * 3600
    assert {"promote.export", APPROVE} <= dag.task_dict["promote.push"].upstream_task_ids
    canary = dag.task_dict["promote.canary_check"]
    assert canary.upstream_task_ids >= {"promote.push"}
    assert "promote.canary_check" in dag.task_dict["register_run"].upstream_task_ids
    for task in dag.tasks:  # every stage task gets its declared inputs, as in the default DAG
        if isinstance(task, StageOperator):
            spec = task.spec()
            missing = [f for f, info in spec.inputs.model_fields.items()
                       if info.is_required() and getattr(task, f) is None]
            assert not missing, f"{task.task_id}: {missing} not wired"
