"""Event-driven runs with a real scheduler, dag-processor and triggerer: an export dropped into
the watched folder starts exactly one run, and a restarted triggerer does not announce it again.

The DAG is a one-task DAG scheduled on the same exports asset as odapi_retrain (the same
`exports_asset`, so the same watcher and trigger): the point is the trigger, and an
EmptyOperator run finishes in the scheduler without a worker. What odapi_retrain does with
such a run is tests/airflow/test_no_new_run.py's and bench/freshness.py's.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

import pytest

from odapi_operators.core.data.sample_data import MARKER

from support.production import Processes, airflow, airflow_env, metadata_database, rows, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
DAG_ID = "on_new_export"
WATCH_SECONDS = 1

_DAG = """
from datetime import datetime

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG

from odapi_operators.assets import exports_asset
from odapi_operators.core.config import ExportsConfig

with DAG({dag_id!r}, start_date=datetime(2026, 1, 1),
         schedule=exports_asset(ExportsConfig(path={exports!r}, watch_seconds={watch}))):
    EmptyOperator(task_id="noop")
"""


def _drop_export(folder: Path) -> None:
    """An export as an annotation tool writes it: files first, the marker last."""
    folder.mkdir(parents=True)
    (folder / "ann.xml").write_text("<annotation/>")
    (folder / MARKER).write_text("")


def test_a_new_export_starts_one_run_and_a_restarted_triggerer_does_not_repeat_it(
        tmp_path: Path) -> None:
    home, exports = tmp_path / "airflow", tmp_path / "exports"
    exports.mkdir()
    dag_file = tmp_path / "dag-src" / f"{DAG_ID}.py"
    dag_file.parent.mkdir()
    dag_file.write_text(_DAG.format(dag_id=DAG_ID, exports=str(exports), watch=WATCH_SECONDS))
    with metadata_database(home) as url:
        env = airflow_env(home, url, dag_file,
                          AIRFLOW__CORE__EXECUTOR="LocalExecutor",
                          AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
                          AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),
                          # a restarted triggerer takes the watcher over within seconds
                          AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC="1",
                          AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD="5",
                          PYTHONUNBUFFERED="1")  # logs reach their files as written
        airflow(env, "db", "migrate")
        processes = Processes(home / "process-logs")

        def runs() -> list[dict]:
            processes.check_alive()
            return rows(url, "SELECT run_id, run_type, state FROM dag_run WHERE dag_id = :d",
                        d=DAG_ID)

        def watching(triggerer: str) -> bool:
            """The watcher runs in `triggerer` (its log says the trigger started)."""
            processes.check_alive()
            log = (home / "process-logs" / f"{triggerer}.log").read_text(errors="replace")
            return re.search(r"trigger ID \d+ starting", log) is not None

        try:
            for name in ("scheduler", "dag-processor", "triggerer"):
                processes.start(name, env, name)
            wait_until(lambda: watching("triggerer"), timeout=120, interval=1,
                       what="the triggerer to run the exports watcher", diagnose=processes.logs)
            assert runs() == [], "a run before any export landed"

            _drop_export(exports / "batch-1")
            dropped = time.monotonic()
            [run] = wait_until(lambda: [r for r in runs() if r["state"] == "success"],
                               timeout=60, interval=0.5, what="the export's run",
                               diagnose=processes.logs)
            started_within = time.monotonic() - dropped
            assert run["run_type"] == "asset_triggered", run
            [event] = rows(url, "SELECT e.extra FROM asset_event e JOIN asset a ON "
                                "a.id = e.asset_id WHERE a.name = 'odapi_annotation_exports'")
            assert str(exports / "batch-1") in str(event["extra"]), event

            # The DAG is registered; the rest needs only the scheduler and the triggerers.
            # The next triggerer starts up (tens of seconds of imports on a busy machine)
            # before the first stops; it takes the watcher over once the first is gone.
            processes.stop(names=["dag-processor"])
            processes.start("triggerer-2", env, "triggerer")
            wait_until(lambda: "Starting the triggerer" in (
                home / "process-logs" / "triggerer-2.log").read_text(errors="replace"),
                timeout=90, interval=0.5, what="the second triggerer to start",
                diagnose=processes.logs)
            processes.stop(names=["triggerer"])
            wait_until(lambda: watching("triggerer-2"), timeout=60, interval=0.5,
                       what="the restarted triggerer to run the watcher",
                       diagnose=processes.logs)
            time.sleep(4 * WATCH_SECONDS)  # several looks at the folder it already announced
            assert len(runs()) == 1, runs()

            # the restarted watcher is alive: a second export is one more run, the first none
            _drop_export(exports / "batch-2")
            wait_until(lambda: len(runs()) == 2 and all(r["state"] == "success"
                                                        for r in runs()),
                       timeout=60, interval=0.5, what="the second export's run",
                       diagnose=processes.logs)
            time.sleep(2 * WATCH_SECONDS)
            assert len(runs()) == 2, runs()
            print(f"\nexport -> run succeeded in {started_within:.1f} s")
        finally:
            processes.stop()
