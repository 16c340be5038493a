"""Benchmark: how fast do new labels reach production? Marker written -> version `stable`.

Starts the embedded Airflow in a throw-away AIRFLOW_HOME (api-server, scheduler,
dag-processor, triggerer; LocalExecutor; the local PostgreSQL when it answers, else SQLite)
with the real odapi_retrain DAG on a pipeline of its own:

1. set-up: a first sample export lies in the exports folder when Airflow starts; the nightly
   run due at start-up (catchup=False) consumes it, trains from scratch and puts version 1 in
   production; the watcher's event for the same export starts a second run that finds nothing
   new (its duration is the "no-new run" line);
2. measured: a second sample export (other images: another prefix) is written, its marker
   last, and the clock runs until `stable` is version 2 in models.config: detection (marker
   -> asset event), queueing (event -> run started), each task, total.

The gate is told to promote whatever trains (`slices: all >= -1`), so the time is the
pipeline's, not the model's luck; training warm-starts from production with
`--warm-steps` (the pipeline default is train.warm_start_steps in
include/configs/pipeline.yaml). Goals on 2 cores: run started within 30 s of the marker;
marker -> stable under 10 min. Long (two trainings, an export each): ON_DEMAND in run.py.

    .venv/bin/python bench/freshness.py [--images 200] [--steps 40] [--warm-steps 600]
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT / "tests")]

from odapi_operators.core.data.sample_data import MARKER, generate  # noqa: E402

from support import production as embedded  # noqa: E402  (tests/: the embedded Airflow)

rows, wait_until = embedded.rows, embedded.wait_until

DAG_ID = "odapi_retrain"
SAMPLE_MODEL = ROOT / "include/configs/models/retinanet_mobile_sample.yaml"


def _pipeline(home: Path, args: argparse.Namespace) -> Path:
    config = {
        "home": str(home),
        "exports": {"path": "exports", "watch_seconds": args.watch_seconds},
        "records": {"split": {"train": 0.75, "val": 0.25}},
        "train": {"model_config": str(SAMPLE_MODEL), "steps": args.steps, "batch_size": 4,
                  "warm_start": True, "warm_start_steps": args.warm_steps,
                  "placement": {"pool": None}},
        "evaluate": {"missing_classes": "warn"},
        "gate": {"slices": [{"slice": "all", "metric": "AP50", "min_delta": -1.0}]},
        "serving": {"base": "serving", "model_name": "shapes"},
    }
    path = home / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _stable(pipeline: Path) -> int | None:
    """The version models.config labels `stable` (None before the first promotion)."""
    from odapi_operators.core.config import load_pipeline_config
    from odapi_operators.core.serving.models_config import entry, labels, read

    serving = load_pipeline_config(pipeline).serving
    path = Path(serving.models_config_path(serving.base))
    return labels(entry(read(path), serving.model_name)).get("stable") if path.is_file() \
        else None


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return _epoch(b) - _epoch(a) if a and b else None


def _epoch(value: datetime) -> float:
    """Seconds since the epoch of a DB timestamp (SQLite's come back naive, in UTC)."""
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def _table(lines: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in lines)


def _pipeline_warm_steps() -> int:
    """The shipped pipeline's warm-start budget: what a user's continuous run trains."""
    config = yaml.safe_load((ROOT / "include/configs/pipeline.yaml").read_text())
    return int(config["train"]["warm_start_steps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200,
                        help="images per sample export (the sample's size)")
    parser.add_argument("--steps", type=int, default=40, help="the first model's steps")
    parser.add_argument("--warm-steps", type=int, default=_pipeline_warm_steps(),
                        help="steps of the measured (warm-started) training; default: the "
                             "pipeline's train.warm_start_steps")
    parser.add_argument("--watch-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="odapi-freshness-"))
    pipeline = _pipeline(home, args)
    generate(home / "exports" / "b1", count=args.images, seed=1, max_side=128, prefix="first")
    api_port = _free_port()
    with embedded.metadata_database(home / "airflow") as url:
        env = embedded.airflow_env(home / "airflow", url, ROOT / "dags" / f"{DAG_ID}.py",
                          ODAPI_PIPELINE_CONFIG=str(pipeline), PYTHONUNBUFFERED="1",
                          AIRFLOW__CORE__EXECUTOR="LocalExecutor",
                          AIRFLOW__CORE__PARALLELISM="2",
                          AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
                          AIRFLOW__CORE__EXECUTION_API_SERVER_URL=(
                              f"http://127.0.0.1:{api_port}/execution/"),
                          AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32))
        print(f"embedded Airflow in {home / 'airflow'} on {url.split(':')[0]}", flush=True)
        embedded.airflow(env, "db", "migrate")
        processes = embedded.Processes(home / "airflow" / "process-logs")

        def runs() -> list[dict]:
            processes.check_alive()
            return rows(url, "SELECT run_id, run_type, state, queued_at, start_date, end_date "
                             "FROM dag_run WHERE dag_id = :d ORDER BY id", d=DAG_ID)

        def idle() -> bool:
            done = runs()
            return bool(done) and all(r["state"] in ("success", "failed") for r in done)

        try:
            processes.start("api-server", env, "api-server", "--host", "127.0.0.1", "--port",
                            str(api_port), "--workers", "1")
            for name in ("scheduler", "dag-processor", "triggerer"):
                processes.start(name, env, name)
            print("set-up: the nightly run trains the first model ...", flush=True)
            wait_until(lambda: _stable(pipeline) == 1 and len(runs()) >= 2 and idle(),
                       timeout=args.timeout, interval=5, what="version 1 in production",
                       diagnose=processes.logs)
            setup = runs()
            if any(r["state"] != "success" for r in setup):
                raise SystemExit(f"set-up runs failed: {setup}\n{processes.logs()}")
            skipped = {r["run_id"] for r in rows(
                url, "SELECT run_id FROM task_instance WHERE dag_id = :d AND task_id = "
                     "'select_exports' AND state = 'skipped'", d=DAG_ID)}
            no_new = [r for r in setup if r["run_id"] in skipped]

            print("measured: a second export lands ...", flush=True)
            generate(home / "exports" / "b2", count=args.images, seed=2, max_side=128,
                     prefix="second")  # other images (names), the marker written last
            marker = (home / "exports" / "b2" / MARKER).stat().st_mtime
            wait_until(lambda: _stable(pipeline) == 2 or None, timeout=args.timeout, interval=1,
                       what="version 2 labelled stable", diagnose=processes.logs)
            served = time.time()
            report(url, home, marker, served, no_new)
        finally:
            processes.stop()


def report(url: str, home: Path, marker: float, served: float, no_new: list[dict]) -> None:
    """Print the phases of the measured run as a table."""
    b2 = str(home / "exports" / "b2")
    events = [e for e in rows(url, "SELECT e.timestamp, e.extra FROM asset_event e JOIN asset a "
                                   "ON a.id = e.asset_id WHERE a.name = "
                                   "'odapi_annotation_exports' ORDER BY e.id")
              if b2 in json.dumps(e["extra"] if isinstance(e["extra"], dict)
                                  else json.loads(e["extra"]))]
    # the run that consumed b2 (the ledger says): the event's run, or a nightly one that
    # happened to start first (then the event's run found nothing new)
    from odapi_operators.core.config import load_pipeline_config
    from odapi_operators.core.data.ledger import Ledger

    ledger = Ledger(load_pipeline_config(home / "pipeline.yaml").exports.ledger)
    [run_id] = [r["run_id"] for r in ledger.records() if r["export"] == b2]
    [run] = rows(url, "SELECT run_id, run_type, queued_at, start_date, end_date FROM dag_run "
                      "WHERE dag_id = :d AND run_id = :r", d=DAG_ID, r=run_id)
    tasks = rows(url, "SELECT task_id, state, queued_dttm, start_date, end_date FROM "
                      "task_instance WHERE run_id = :r AND state = 'success' "
                      "ORDER BY start_date", r=run["run_id"])
    detected = _epoch(events[0]["timestamp"]) if events else None
    lines = [("detection (marker -> asset event)",
              f"{detected - marker:6.1f} s" if detected else "no event")]
    if detected:
        lines.append(("queueing (event -> run started)",
                      f"{_epoch(run['start_date']) - detected:6.1f} s"))
    lines.append((f"consumed by a {run['run_type']} run", run["run_id"]))
    lines.append(("run started after the marker",
                  f"{_epoch(run['start_date']) - marker:6.1f} s  (goal < 30 s)"))
    for task in tasks:
        wait = _seconds(task["queued_dttm"], task["start_date"])
        lines.append((f"  {task['task_id']}",
                      f"{_seconds(task['start_date'], task['end_date']):6.1f} s"
                      + (f"  (+{wait:.1f} s queued)" if wait else "")))
    lines.append(("total: marker -> stable is v2",
                  f"{served - marker:6.1f} s  (goal < 600 s)"))
    for run_row in no_new:
        lines.append((f"no-new run ({run_row['run_type']})",
                      f"{_seconds(run_row['start_date'], run_row['end_date']):6.1f} s"
                      "  (goal < 60 s)"))
    print(_table(lines), flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
