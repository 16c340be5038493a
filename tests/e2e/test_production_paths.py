"""The production paths for real: odapi_retrain on a PostgreSQL metadata DB, and on a
CeleryExecutor cluster (Redis broker, api-server, scheduler, dag-processor, two workers) that
routes training to the `gpu` queue. Every Airflow component is a real subprocess with its own
AIRFLOW_HOME and a fresh database; what happened is read back from PostgreSQL itself.

Needs PostgreSQL and Redis on 127.0.0.1: skipped without them, failed without them when $CI is
set (CI promises them). Each run takes minutes: training, evaluation and export are real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, free_port
from support import production
from support.production import (
    REDIS_HOST,
    REDIS_PORT,
    TESTS,
    WORKER_NAME_VAR,
    Processes,
    airflow,
    airflow_env,
    pg_url,
    postgres_database,
    query,
    redis_database,
    require,
    task_logs,
    wait_until,
    write_pipeline,
)

DAG_ID = "odapi_retrain"
DAG_FILE = ROOT / "dags" / "odapi_retrain.py"
PREPARE = ["resolve_config", "wait_for_export", "select_exports", "prepare.ingest",
           "prepare.fetch_images", "prepare.verify_images", "prepare.label_map",
           "prepare.write_tfrecords"]
RUN_TIMEOUT = 1500  # s; `dags test` took 650-870 s on a 2-core machine with load 6-8


def task_instances(database: str, run_id: str) -> dict[str, dict]:
    """task_id -> its task_instance row (state, pool, queue, hostname) for one run."""
    rows = query(database, "SELECT task_id, state, pool, queue, hostname FROM task_instance "
                           "WHERE dag_id = %s AND run_id = %s", DAG_ID, run_id)
    return {row["task_id"]: row for row in rows}


def states(instances: dict[str, dict]) -> dict[str, str]:
    return {task_id: row["state"] for task_id, row in instances.items()}


def unfinished(instances: dict[str, dict]) -> list[str]:
    """Tasks that did not succeed or skip: the ones whose logs explain a failure."""
    return [t for t, row in instances.items() if row["state"] not in ("success", "skipped")]


@pytest.fixture()
def database() -> Iterator[str]:
    """A fresh PostgreSQL database for one Airflow (dropped afterwards)."""
    require("PostgreSQL")
    with postgres_database() as name:
        yield name


@pytest.fixture()
def broker() -> Iterator[int]:
    """An empty Redis db number for one Celery cluster (flushed afterwards)."""
    require("PostgreSQL", "Redis")  # probe both first: the message names all that is missing
    with redis_database() as number:
        yield number


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_retrain_on_postgres_pushes_a_serving_version(database, tmp_path):
    """`airflow dags test` against a freshly migrated PostgreSQL DB: the run, its task
    instances and the push's served-model Asset event are all in PostgreSQL."""
    pipeline = write_pipeline(tmp_path / "odapi", {"where": "local", "pool": "gpu"})
    env = airflow_env(tmp_path / "airflow", database, DAG_FILE,
                      ODAPI_PIPELINE_CONFIG=str(pipeline))
    airflow(env, "db", "migrate")
    airflow(env, "pools", "set", "gpu", "1", "GPU")
    output = airflow(env, "dags", "test", DAG_ID, "-c", json.dumps({"train_steps": 2}),
                     timeout=RUN_TIMEOUT)

    [run] = query(database, "SELECT run_id, state FROM dag_run WHERE dag_id = %s", DAG_ID)
    instances = task_instances(database, run["run_id"])
    assert run["state"] == "success", f"{json.dumps(states(instances))}\n{output[-8000:]}"
    ran = PREPARE + ["model.train", "model.evaluate", "model.evaluate_production",
                     "promote.gate", "promote.report", "promote.export", "promote.push",
                     "register_run"]
    assert {t: states(instances).get(t) for t in ran} == dict.fromkeys(ran, "success")
    assert instances["promote.not_promoted"]["state"] == "skipped"
    assert instances["model.train"]["pool"] == "gpu"

    [served] = query(database, "SELECT e.extra FROM asset_event e JOIN asset a "
                               "ON a.id = e.asset_id WHERE a.name = 'odapi_served_model' "
                               "AND e.source_run_id = %s", run["run_id"])
    assert served["extra"]["model_name"] == "shapes" and served["extra"]["version"] == 1
    assert (Path(served["extra"]["path"]) / "saved_model.pb").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_celery_routes_training_to_the_gpu_worker(broker, database, tmp_path):
    """A triggered odapi_retrain run on CeleryExecutor: `model.train` runs on the worker
    serving `-q gpu`, every other task on the `default` worker. The gate is set to reject
    (min_ap50 1.0), so export and push, already proven above, are skipped to save time."""
    home = tmp_path / "airflow"
    pipeline = write_pipeline(tmp_path / "odapi",
                              {"where": "celery", "queue": "gpu", "pool": "gpu"})
    api_port = free_port()
    env = airflow_env(
        home, database, DAG_FILE,
        ODAPI_PIPELINE_CONFIG=str(pipeline),
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
        AIRFLOW__CELERY__BROKER_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/{broker}",
        AIRFLOW__CELERY__RESULT_BACKEND="db+" + pg_url(database, "postgresql"),
        # workers report task states to the api-server's Execution API, not to the DB
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",  # unpausing adds no nightly run
    )
    airflow(env, "db", "migrate")
    airflow(env, "pools", "set", "gpu", "1", "GPU")
    processes = Processes(home / "process-logs")
    try:
        start_cluster(processes, env, api_port)
        wait_until(lambda: processes.check_alive() or query(
            database, "SELECT 1 FROM serialized_dag WHERE dag_id = %s", DAG_ID),
            timeout=300, what=f"the dag-processor to serialize {DAG_ID}",
            diagnose=processes.logs)
        airflow(env, "dags", "unpause", DAG_ID)
        airflow(env, "dags", "trigger", DAG_ID, "--run-id", "celery-gpu",
                "-c", json.dumps({"train_steps": 1, "min_ap50": 1.0}))
        finished = wait_until(
            lambda: processes.check_alive() or query(
                database, "SELECT state FROM dag_run WHERE run_id = 'celery-gpu' "
                          "AND state IN ('success', 'failed')"),
            timeout=RUN_TIMEOUT, what="the celery-gpu run to finish", interval=5,
            diagnose=lambda: report(home, task_instances(database, "celery-gpu"),
                                    processes.logs()))
        instances = task_instances(database, "celery-gpu")
        assert finished[0]["state"] == "success", report(home, instances, processes.logs())
    finally:
        processes.stop()

    train = instances.pop("model.train")
    assert (train["state"], train["queue"], train["pool"], train["hostname"]) == (
        "success", "gpu", "gpu", "gpu-worker")
    ran = {t: row for t, row in instances.items() if row["state"] != "skipped"}
    assert set(PREPARE) | {"model.evaluate", "promote.gate", "register_run"} <= set(ran)
    assert {(row["queue"], row["hostname"]) for row in ran.values()} == {
        ("default", "default-worker")}
    assert states(instances)["promote.push"] == "skipped"


def test_missing_services_skip_or_under_ci_fail(monkeypatch):
    """The probe names what is missing; with $CI set it fails instead of skipping."""
    closed = free_port()  # nothing listens there any more
    monkeypatch.setitem(production.SERVICES, "Redis", ("127.0.0.1", closed))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"Redis at 127.0.0.1:{closed}$"):
        require("PostgreSQL", "Redis")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not reachable: Redis"):
        require("Redis")


def report(home: Path, instances: dict[str, dict], *more: str) -> str:
    """Task states, then the logs of every task that did not succeed or skip, then `more`."""
    return "\n".join([json.dumps(states(instances), indent=1),
                      task_logs(home, DAG_ID, unfinished(instances)), *more])


def start_cluster(processes: Processes, env: dict[str, str], api_port: int) -> None:
    """api-server (Execution API only), scheduler, dag-processor, and one Celery worker per
    queue, each reporting its own name as task_instance.hostname."""
    processes.start("api-server", env, "api-server", "--apps", "execution", "--host",
                    "127.0.0.1", "--port", str(api_port), "--workers", "1")
    processes.start("scheduler", env, "scheduler")
    processes.start("dag-processor", env, "dag-processor")
    for queue in ("default", "gpu"):
        name = f"{queue}-worker"
        worker_env = {**env, WORKER_NAME_VAR: name,
                      "AIRFLOW__CORE__HOSTNAME_CALLABLE": "support.production.worker_hostname",
                      "PYTHONPATH": f"{TESTS}:{env.get('PYTHONPATH', '')}".rstrip(":")}
        # --skip-serve-logs: two workers on one machine would both bind port 8793
        processes.start(name, worker_env, "celery", "worker", "-q", queue, "--concurrency",
                        "1", "--celery-hostname", f"{queue}@odapi-test", "--skip-serve-logs")
