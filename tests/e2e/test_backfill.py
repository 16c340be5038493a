"""The production paths, in one real `airflow backfill create` of odapi_retrain over days with
and without exports.

The Airflow is the production shape: a PostgreSQL metadata DB and a CeleryExecutor cluster
(Redis broker, api-server for the Execution API, scheduler, dag-processor, one worker on the
`default` queue and one on `gpu`). Each backfill run covers one daily data interval and must
consume exactly the exports whose `_SUCCESS` marker landed in it; a day with none must skip
instead of retraining; training runs on the `gpu` worker and in the `gpu` pool, everything else
on the `default` worker; every gate compares with what Serving answered with at that point (so
no backfill run promotes by accident), the second trained day warm-starts from the first day's
push and is evaluated against it on the same split. One cluster proves all of it: each
TensorFlow start-up costs a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from odapi_operators.core.data.sample_data import MARKER, generate
from odapi_operators.core.layout import RunLayout

from conftest import ROOT, free_port, tiny_model_config
from support.production import (
    Processes,
    airflow,
    airflow_env,
    celery_settings,
    query,
    start_cluster,
    task_logs,
    wait_until,
)

# Two days with an export (the second gated against the first's push) and one without: the
# least that shows consumption by landing day, skipping, and gating against production. The
# Airflow side takes ~1 s per task; TensorFlow's fixed costs (import, graph tracing, export)
# make each training run minutes on 2 cores.
BACKFILL_TIMEOUT_S = 2400
pytestmark = [pytest.mark.slow, pytest.mark.timeout(BACKFILL_TIMEOUT_S + 300)]

DAG_ID = "odapi_retrain"
UTC = timezone.utc
LANDED = {  # export -> when its marker landed; nothing lands on 03-03
    "batch-0302": datetime(2026, 3, 2, 10, tzinfo=UTC),
    "batch-0304": datetime(2026, 3, 4, 9, tzinfo=UTC),
}
FROM_DATE, TO_DATE = "2026-03-02", "2026-03-05"
# CronDataIntervalTimetable("0 3 * * *"): the runs whose logical date (interval start) is in
# [FROM_DATE, TO_DATE], each covering one day from 03:00.
Instances = dict[tuple[str, str], dict[str, Any]]  # (run id, task id) -> its row
INTERVAL_STARTS = [datetime(2026, 3, day, 3, tzinfo=UTC) for day in (2, 3, 4)]


@pytest.fixture()
def pipeline(tmp_path: Path) -> Path:
    """Two small exports with backdated markers and a tiny-training pipeline YAML."""
    for seed, (name, landed) in enumerate(LANDED.items(), start=21):
        generate(tmp_path / "exports" / name, count=12, seed=seed, max_side=128)
        os.utime(tmp_path / "exports" / name / MARKER, (landed.timestamp(),) * 2)
    config = {
        "home": str(tmp_path),
        "exports": {"path": "exports"},
        "records": {"split": {"train": 0.6, "val": 0.4}},
        "train": {"model_config": str(tiny_model_config(tmp_path / "models")),
                  "steps": 3, "batch_size": 2, "warm_start": True,  # from what is served
                  "placement": {"where": "celery", "queue": "gpu", "pool": "gpu"}},
        "evaluate": {"missing_classes": "warn"},
        # The first model is promoted by rule; a later one must beat production's AP50 by 1.0,
        # which no model can: the second day is gated against the first day's push and
        # rejected, so the backfill exports once.
        "gate": {"min_ap50": 0.0, "vs_production": {"AP50": {"min_delta": 1.0}}},
        "serving": {"base": "serving", "model_name": "shapes"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _utc(value: datetime) -> datetime:
    """A timestamptz from PostgreSQL (in the session's time zone) in UTC, to compare."""
    return value.astimezone(UTC)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _run_backfill(home: Path, database: str, broker: int, pipeline: Path,
                  command: list[str]) -> dict[str, Any]:
    """Start the Celery cluster, create the backfill with the CLI, wait for the scheduler to
    finish it; runs, task instances (state, queue, pool, worker), select_exports XComs and
    served-model asset events as PostgreSQL has them."""
    api_port = free_port()
    env = airflow_env(
        home, database, ROOT / "dags" / f"{DAG_ID}.py",
        ODAPI_PIPELINE_CONFIG=str(pipeline),
        **celery_settings(database, broker, api_port),
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),
        # Only the backfill's runs: no scheduled run may consume the exports behind its back.
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
    )
    airflow(env, "db", "migrate")
    airflow(env, "pools", "set", "gpu", "1", "GPU")
    processes = Processes(home / "process-logs")

    def diagnose() -> str:
        rows = query(database, "SELECT task_id, state FROM task_instance WHERE state IN "
                               "('failed', 'up_for_retry', 'running', 'queued')")
        return "\n".join([json.dumps(rows), task_logs(home, DAG_ID, {r["task_id"] for r in rows}),
                          processes.logs()])

    try:
        start_cluster(processes, env, api_port)
        wait_until(lambda: processes.check_alive() or query(
            database, "SELECT 1 FROM serialized_dag WHERE dag_id = %s", DAG_ID),
            timeout=300, what=f"the dag-processor to serialize {DAG_ID}", diagnose=diagnose)
        airflow(env, *command)
        wait_until(lambda: processes.check_alive() or query(
            database, "SELECT id FROM backfill WHERE dag_id = %s AND completed_at IS NOT NULL",
            DAG_ID), timeout=BACKFILL_TIMEOUT_S, what="the backfill to complete",
            diagnose=diagnose, interval=5)
        runs = query(database, "SELECT run_id, run_type, state, logical_date, "
                               "data_interval_start, data_interval_end FROM dag_run "
                               "WHERE dag_id = %s ORDER BY logical_date", DAG_ID)
        failed = [r for r in runs if r["state"] != "success"]
        return {"runs": runs, "diagnostics": diagnose() if failed else "",
                "instances": {(r["run_id"], r["task_id"]): r for r in query(
                    database, "SELECT run_id, task_id, state, queue, pool, hostname "
                              "FROM task_instance WHERE dag_id = %s", DAG_ID)},
                "served": {r["source_run_id"]: r["extra"] for r in query(
                    database, "SELECT e.source_run_id, e.extra FROM asset_event e JOIN asset a "
                              "ON a.id = e.asset_id WHERE a.name = 'odapi_served_model'")},
                "selected": {r["run_id"]: r["value"] for r in query(
                    database, "SELECT run_id, value FROM xcom WHERE dag_id = %s AND "
                              "task_id = 'select_exports' AND key = 'return_value'", DAG_ID)}}
    finally:
        processes.stop()


def _state(instances: Instances, run_id: str, task_id: str) -> str | None:
    row = instances.get((run_id, task_id))
    return row and row["state"]


def _check_placement(run_id: str, instances: Instances) -> None:
    """Training ran on the gpu worker, in the gpu pool; every other task on the default one."""
    ran = {task: row for (run, task), row in instances.items()
           if run == run_id and row["state"] != "skipped"}
    train = ran.pop("model.train")
    assert (train["state"], train["queue"], train["pool"], train["hostname"]) == (
        "success", "gpu", "gpu", "gpu-worker"), (run_id, train)
    assert {(row["queue"], row["hostname"]) for row in ran.values()} == {
        ("default", "default-worker")}, (run_id, ran)


def _check_gate(run_id: str, run_dir: Path, instances: Instances, served: dict[str, dict],
                registry: Path, stable: int | None) -> int | None:
    """One trained run: it warm-started from what Serving answered with (`stable`), its gate
    compared with that version evaluated on the same split, and only a promotion exported and
    pushed. Returns what Serving answers with afterwards."""
    decision = _read_json(run_dir / "gate" / "decision.json")
    pushed = _read_json(run_dir / "push" / "summary.json")
    assert decision is not None, f"{run_id}: no gate/decision.json"
    assert decision["baseline"]["version"] == stable, (run_id, decision["baseline"])
    assert decision["first_model"] is (stable is None), (run_id, decision["rule"])
    assert not decision["forced"], run_id
    trained = _read_json(run_dir / "train" / "summary.json")
    assert trained["start"].get("production_version") == stable, (run_id, trained["start"])
    checks = {c["kind"]: c for c in decision["checks"]}
    if stable is not None:
        assert checks["same_split"]["verdict"] == "pass", (run_id, checks["same_split"])
        production = _read_json(run_dir / "evaluate" / "production" / "metrics.json")
        candidate = _read_json(run_dir / "evaluate" / "candidate" / "metrics.json")
        assert production["model_kind"] == "saved_model", run_id
        assert production["model"].endswith(f"shapes/{stable}"), (run_id, production["model"])
        assert production["eval_images"] == candidate["eval_images"] > 0, run_id
        assert "no production model" not in (run_dir / "report" / "report.html").read_text()
    if not decision["promoted"]:
        assert checks["vs_production"]["verdict"] == "fail", (run_id, decision["checks"])
        assert pushed is None and run_id not in served, run_id
        for task, state in {"promote.export": "skipped", "promote.push": "skipped",
                            "promote.not_promoted": "success",
                            "register_run": "success"}.items():
            assert _state(instances, run_id, task) == state, (run_id, task)
        [record] = [r for r in map(json.loads, registry.read_text().splitlines())
                    if r.get("run_id") == run_id and r.get("kind") == "candidate"]
        assert record["decision"]["promoted"] is False, record
        return stable
    assert decision["rule"] == ("first_model" if stable is None else "checks"), run_id
    assert checks["vs_production"]["verdict"] == ("skipped" if stable is None else "pass")
    assert _state(instances, run_id, "promote.push") == "success", run_id
    assert _state(instances, run_id, "promote.not_promoted") == "skipped", run_id
    assert pushed and pushed["version"] == (stable or 0) + 1, (run_id, pushed)
    # the push's asset event is in PostgreSQL, naming a version that loads
    event = served[run_id]
    assert (event["model_name"], event["version"]) == ("shapes", pushed["version"]), event
    version = Path(event["path"])
    assert (version / "saved_model.pb").is_file(), event
    assert {p.name for p in (version / "assets.extra").iterdir()} >= {
        "label_map.pbtxt", "params.yaml", "pipeline.json", "metrics.json", "decision.json",
        "tf_serving_warmup_requests"}, event
    assert not [p for p in version.parent.iterdir() if p.name.startswith(".tmp")]
    # the export replayed its warmup requests through the SavedModel's signature and
    # compared them with the checkpoint's detections
    exported = _read_json(run_dir / "export" / "summary.json")
    check = exported["check"]
    assert check["warmup_requests"] >= 1 and check["max_difference"] <= 1e-3, check
    # ... in the evaluation's process: the export task copied it and added the extras
    assert exported["ahead"] == str(run_dir / "export_ahead"), exported
    return pushed["version"]


def _row(run_id: str, start: datetime, end: datetime, consumed: list[str], selected: str,
         decision: dict | None, pushed: dict | None) -> tuple[str, ...]:
    """One line of the table in the closing note."""
    gate = ap50 = "-"
    if decision is not None:
        baseline = decision["baseline"]["version"]
        gate = (f"{'promoted' if decision['promoted'] else 'rejected'} ({decision['rule']}), "
                f"{f'vs v{baseline}' if baseline else 'nothing served'}")
        check = next(c for c in decision["checks"] if c["kind"] == "vs_production")
        ap50 = f"{check['value']:.4f}" + (f" vs {check['baseline']:.4f}" if baseline else "")
    return (run_id, f"{start:%m-%d %H:%M} .. {end:%m-%d %H:%M}",
            ", ".join(Path(p).name for p in consumed) or "-", selected, gate, ap50,
            "-" if pushed is None else f"v{pushed['version']}")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("run_id", "data interval (UTC)", "consumed", "select_exports", "gate",
              "AP50 (vs production)", "pushed")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print("\n".join(" | ".join(c.ljust(w) for c, w in zip(row, widths))
                    for row in [header, *rows]))


def test_backfill_consumes_exports_by_landing_day_and_gates_against_production(
        pipeline: Path, database: str, broker: int, tmp_path: Path) -> None:
    from odapi_operators.core.config import load_pipeline_config
    from odapi_operators.core.data.ledger import Ledger
    from odapi_operators.core.serving.models_config import entry, labels
    from odapi_operators.core.serving.models_config import read as read_models_config

    command = ["backfill", "create", "--dag-id", DAG_ID, "--from-date", FROM_DATE,
               "--to-date", TO_DATE, "--reprocess-behavior", "none", "--max-active-runs", "1"]
    started = time.monotonic()
    done = _run_backfill(tmp_path / "airflow", database, broker, pipeline, command)
    elapsed = time.monotonic() - started
    runs, instances = done["runs"], done["instances"]

    # One run per daily interval, each a whole day (never the zero-length trigger interval).
    assert [_utc(r["logical_date"]) for r in runs] == INTERVAL_STARTS, runs
    assert all(r["run_type"] == "backfill" for r in runs), runs
    assert all(r["state"] == "success" for r in runs), f"{runs}\n{done['diagnostics']}"
    for run in runs:
        assert _utc(run["data_interval_start"]) == _utc(run["logical_date"])
        assert (_utc(run["data_interval_end"]) - _utc(run["data_interval_start"])
                == timedelta(days=1)), run

    config = load_pipeline_config(pipeline)
    ledger = Ledger(config.exports.ledger).records()
    assert {r["mode"] for r in ledger} == {"backfill"}, ledger
    registry = Path(config.serving.registry_path(config.serving.base))
    stable: int | None = None  # the version Serving answers with, replayed run by run
    table = []
    for run in runs:
        run_id = run["run_id"]
        start, end = _utc(run["data_interval_start"]), _utc(run["data_interval_end"])
        landed = [str(pipeline.parent / "exports" / name) for name, at in LANDED.items()
                  if start <= at < end]
        consumed = [r["export"] for r in ledger if r["run_id"] == run_id]
        assert consumed == landed, (run_id, consumed, landed)
        run_dir = RunLayout(Path(config.runs), run_id).root
        selected = _state(instances, run_id, "select_exports")
        if landed:
            assert selected == "success", run_id
            assert done["selected"][run_id] == landed, run_id
            _check_placement(run_id, instances)
            stable = _check_gate(run_id, run_dir, instances, done["served"], registry, stable)
        else:  # nothing landed: skip, never retrain on exports other runs consumed
            assert selected == "skipped", run_id
            assert _state(instances, run_id, "model.train") == "skipped", run_id
            assert run_id not in done["selected"], run_id
            assert not (run_dir / "gate" / "decision.json").exists(), run_id
        table.append(_row(run_id, start, end, consumed, selected,
                          _read_json(run_dir / "gate" / "decision.json"),
                          _read_json(run_dir / "push" / "summary.json")))

    assert stable == 1, "the first interval with an export promotes (first model), once"
    serving = Path(config.serving.base) / config.serving.model_name
    assert sorted(int(p.name) for p in serving.iterdir() if p.name.isdigit()) == list(
        range(1, stable + 1))
    models_config = read_models_config(config.serving.models_config_path(config.serving.base))
    assert labels(entry(models_config, config.serving.model_name))["stable"] == stable

    print(f"\n$ airflow {' '.join(command)}")
    _print_table(table)
    print(f"backfill test took {elapsed:.0f} s")
