"""Images as partitions on the production path: two Celery workers (Redis broker, PostgreSQL
metadata DB, a real scheduler) share the mapped partition tasks of one run, and one of them
is lost (SIGKILL, all of its processes) in the middle of a partition.

The DAG is odapi_retrain's data part after ingest, wired by the same `partitioned_records` (no
training: what is proven here is where the partitions run and what they write), scheduled
`@once` so the run starts as soon as the DAG is parsed. The lost partition is
failed by the scheduler once its heartbeat stops and retried alone; the other partitions keep
what they wrote, untouched; the records equal, byte for byte, what one process running the
same tasks one after another writes.
"""

from __future__ import annotations

import json
import secrets
import textwrap
import time
from pathlib import Path

import pytest

from odapi_operators.core.data.sample_data import generate

from conftest import free_port
from support.partitions import run_partitioned, shards
from support.processes import gone, in_session, kill_session
from support.production import (
    Processes,
    airflow,
    airflow_env,
    celery_settings,
    query,
    start_cluster,
    start_worker,
    task_logs,
    wait_until,
)

TIMEOUT_S = 240  # observed ~60 s on 2 busy cores; the bound only stops a hung cluster
pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S + 60)]

DAG_ID = "odapi_partitions"
IMAGES, PARTITIONS = 32, 3
PAUSE = "prepare:verifying"  # worker-a's first partition stops here: fetched, verify begun
DAG_FILE = textwrap.dedent('''
    """odapi_retrain's data tasks with images as partitions (test_partitions_celery.py)."""
    from datetime import datetime, timedelta

    from airflow.sdk import DAG

    from odapi_operators.operators import ResolvePipelineConfigOperator
    from odapi_operators.partitioned import partitioned_records

    with DAG({dag_id!r}, schedule="@once", start_date=datetime(2026, 1, 1),
             default_args={{"retries": 1, "retry_delay": timedelta(seconds=0)}}) as dag:
        cfg = ResolvePipelineConfigOperator(task_id="config",
                                            pipeline_config={pipeline!r}).output["config"]
        partitioned_records(cfg, {manifest!r})
''')


def _pipeline(home: Path, export: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "pipeline.yaml"
    path.write_text(json.dumps({
        "home": str(home), "exports": {"path": str(export)},
        "images": {"max_side": 64, "partitions": PARTITIONS},
        "train": {"model_config": "m.yaml", "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    return path


def _stamps(folders: list[Path]) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders
            for p in folder.rglob("*") if p.is_file()}


def _instances(database: str) -> list[dict]:
    """Every attempt of every task of the run: finished tries (history) and the current."""
    columns = "task_id, map_index, try_number, state, hostname"
    return (query(database, f"SELECT {columns} FROM task_instance_history WHERE dag_id = %s",
                  DAG_ID) +
            query(database, f"SELECT {columns} FROM task_instance WHERE dag_id = %s", DAG_ID))


def test_partitions_spread_over_two_workers_and_a_lost_one_reruns_alone(
        tmp_path: Path, database: str, broker: int) -> None:
    started = time.monotonic()
    export = tmp_path / "export"
    generate(export, count=IMAGES, seed=11, max_side=96)
    # one process, the tasks one after another: the reference
    single = run_partitioned(_pipeline(tmp_path / "single", export), export)
    reference = single / "records"

    home = tmp_path / "cluster"
    pipeline = _pipeline(home, export)
    dag_file = tmp_path / f"{DAG_ID}.py"
    dag_file.write_text(DAG_FILE.format(dag_id=DAG_ID, pipeline=str(pipeline),
                                        manifest=str(single / "ingest" / "manifest.jsonl")))
    api_port = free_port()
    env = airflow_env(
        tmp_path / "airflow", database, dag_file, **celery_settings(database, broker, api_port),
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        # a lost worker's task is failed (and retried) once its heartbeat is this old
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="5",
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="1",
        AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL="1")
    airflow(env, "db", "migrate")
    processes = Processes(tmp_path / "process-logs")
    paused = tmp_path / "paused"
    run_dir = home / "var" / "runs"

    def diagnose() -> str:
        return "\n".join([json.dumps(_instances(database), default=str),
                          task_logs(tmp_path / "airflow", DAG_ID,
                                    {"prepare_partition", "shard_partition", "join_partitions"}),
                          processes.logs()])

    def ready(name: str) -> bool:
        return f"{name}@odapi-test ready." in (processes.log_dir / f"{name}.log").read_text(
            errors="replace")

    try:
        # both workers consume before the scheduler queues anything: each takes a partition
        start_worker(processes, env, "worker-a", "default", ODAPI_PAUSE_AT=PAUSE,
                     ODAPI_PAUSE_SIGNAL=str(paused))
        start_worker(processes, env, "worker-b", "default")
        wait_until(lambda: processes.check_alive() or (ready("worker-a") and ready("worker-b")),
                   timeout=120, what="both workers ready", diagnose=processes.logs,
                   interval=0.5)
        start_cluster(processes, env, api_port, workers={})

        # worker-a stops inside its first partition; worker-b prepares all the others
        wait_until(lambda: processes.check_alive() or paused.exists(), timeout=180,
                   what="worker-a inside a partition", diagnose=diagnose, interval=0.5)
        wait_until(lambda: len(query(
            database, "SELECT 1 FROM task_instance WHERE dag_id = %s AND task_id = "
                      "'prepare_partition' AND state = 'success'", DAG_ID)) == PARTITIONS - 1,
            timeout=120, what="worker-b to prepare the other partitions", diagnose=diagnose,
            interval=0.5)
        [lost] = query(database, "SELECT map_index, hostname FROM task_instance WHERE "
                                 "dag_id = %s AND task_id = 'prepare_partition' AND state = "
                                 "'running'", DAG_ID)
        assert lost["hostname"] == "worker-a", lost
        [run] = [p for p in run_dir.iterdir()]
        folders = sorted((run / "partitions").glob("part-*"))
        others = [f for i, f in enumerate(folders) if i != lost["map_index"]]
        before = _stamps(others)
        assert not (folders[lost["map_index"]] / "verify" / "manifest.jsonl").exists()

        # worker-a is lost: SIGKILL to every process of its session (the task runner leads a
        # process group of its own); the stage's child, in a session of its own, dies with it
        stage_pid = int(paused.read_text())
        worker = processes.started["worker-a"]
        kill_session(worker.pid)
        worker.wait()
        assert gone([stage_pid, *in_session(worker.pid)]) == []
        lost_at = time.monotonic()
        start_worker(processes, env, "worker-a", "default")  # the machine comes back

        wait_until(lambda: processes.check_alive() or query(
            database, "SELECT state FROM dag_run WHERE dag_id = %s AND state IN "
                      "('success', 'failed')", DAG_ID),
            timeout=TIMEOUT_S, what="the run to finish", diagnose=diagnose)
        recovered = time.monotonic() - lost_at
        [state] = query(database, "SELECT state FROM dag_run WHERE dag_id = %s", DAG_ID)
        assert state["state"] == "success", diagnose()
        attempts = _instances(database)
    finally:
        processes.stop()

    mapped = [a for a in attempts if a["task_id"] in ("prepare_partition", "shard_partition")]
    # the lost partition ran twice (lost on worker-a, then done); every other partition once
    tries = {(a["task_id"], a["map_index"]): [] for a in mapped}
    for attempt in sorted(mapped, key=lambda a: a["try_number"]):
        tries[(attempt["task_id"], attempt["map_index"])].append(
            (attempt["state"], attempt["hostname"]))
    first, last = tries.pop(("prepare_partition", lost["map_index"]))
    assert first[1] == "worker-a" and last[0] == "success", (first, last)
    assert all(len(runs) == 1 and runs[0][0] == "success" for runs in tries.values()), tries
    ran_on = {a["hostname"] for a in mapped if a["state"] == "success"}
    assert ran_on == {"worker-a", "worker-b"}, tries

    # the lost partition's re-run left the others as they were, and nothing partial
    assert _stamps(others) == before
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-")]
    records = run / "records"
    assert sorted(shards(records)) == [f"{split}-{i:05d}-of-{PARTITIONS:05d}.tfrecord"
                                       for split in ("train", "val") for i in range(PARTITIONS)]
    assert shards(records) == shards(reference)
    assert (records / "source_ids.json").read_bytes() == (
        reference / "source_ids.json").read_bytes()
    print(f"\npartitions on {sorted(ran_on)}; lost partition {lost['map_index']} recovered "
          f"in {recovered:.0f} s; test took {time.monotonic() - started:.0f} s")
