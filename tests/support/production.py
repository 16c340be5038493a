"""The production services for tests: PostgreSQL metadata DBs, a Redis broker, and Airflow
components (api-server, scheduler, dag-processor, Celery workers) as real processes.

Every resource is throw-away and torn down in `finally`: a database named odapi_test_<hex>,
an empty Redis db number, an AIRFLOW_HOME under tmp, process groups killed on the way out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

# Not conftest.ROOT: workers import this module (worker_hostname), and importing conftest
# would repoint their AIRFLOW_HOME and metadata DB.
ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
PG_HOST, PG_PORT, PG_ADMIN_DB = "127.0.0.1", 5432, "test"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
SERVICES = {"PostgreSQL": (PG_HOST, PG_PORT), "Redis": (REDIS_HOST, REDIS_PORT)}
WORKER_NAME_VAR = "ODAPI_TEST_WORKER_NAME"
T = TypeVar("T")


def require(*services: str) -> None:
    """Skip unless every named service (keys of SERVICES) answers on its port; under CI
    (`$CI` set) fail instead: CI promises the services, so a missing one is a broken CI."""
    missing = []
    for name in services:
        try:
            socket.create_connection(SERVICES[name], timeout=2).close()
        except OSError:
            missing.append("{} at {}:{}".format(name, *SERVICES[name]))
    if missing:
        import pytest

        message = "production services not reachable: " + ", ".join(missing)
        (pytest.fail if os.environ.get("CI") else pytest.skip)(message)


def _connect(database: str):
    import psycopg2

    return psycopg2.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname=database)


def _admin(sql: str) -> None:
    """Run one statement on the admin database, outside a transaction (CREATE/DROP DATABASE)."""
    conn = _connect(PG_ADMIN_DB)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty database (its name), dropped afterwards even if sessions still hold it."""
    name = f"odapi_test_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def metadata_database(home: Path) -> Iterator[str]:
    """SQLAlchemy URL of a throw-away metadata DB: PostgreSQL when the local server answers
    (several components write at once), else SQLite under `home` (the embedded default)."""
    try:
        socket.create_connection(SERVICES["PostgreSQL"], timeout=2).close()
    except OSError:
        home.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{home.resolve()}/airflow.db"
        return
    with postgres_database() as name:
        yield pg_url(name)


def rows(url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    """Rows of `sql` (named :params) in the metadata DB at `url`, PostgreSQL or SQLite."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sqlalchemy.text(sql), params)]
    finally:
        engine.dispose()


def pg_url(database: str, scheme: str = "postgresql+psycopg2") -> str:
    """SQLAlchemy URL of `database` on the local server (trust auth, user postgres)."""
    return f"{scheme}://postgres@{PG_HOST}:{PG_PORT}/{database}"


def query(database: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Rows of `sql` in `database`, as dicts."""
    import psycopg2.extras

    conn = _connect(database)
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(sql, params)
            return [dict(row) for row in cur.fetchall()]
    finally:
        conn.close()


CLAIM_KEY = "odapi-test:claimed-by"


@contextmanager
def redis_database() -> Iterator[int]:
    """An unused Redis db number (1-15, never 0), flushed afterwards. Claimed atomically
    (SET NX of a claim key inside it): tests running at once, in pytest-xdist workers or
    other checkouts, never share a broker. The claim key is the only key besides Celery's."""
    import redis

    for number in range(15, 0, -1):
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
        if client.dbsize() == 0 and client.set(CLAIM_KEY, f"{socket.gethostname()}:"
                                                           f"{os.getpid()}", nx=True):
            break
        client.close()
    else:
        raise RuntimeError("no empty Redis database among 1-15")
    try:
        yield number
    finally:
        client.flushdb()  # the claim too
        client.close()


def airflow_env(home: Path, database: str, dag_file: Path, **settings: str) -> dict[str, str]:
    """The environment of an Airflow on `database` (a PostgreSQL database name, or a URL)
    with its own AIRFLOW_HOME whose DAGs folder holds only `dag_file` (linked: a sibling DAG
    being edited cannot break the run); `settings` are extra variables
    (AIRFLOW__SECTION__KEY=...). Overrides the conftest's SQLite conn, in the child processes
    only."""
    (home / "dags").mkdir(parents=True, exist_ok=True)
    (home / "dags" / dag_file.name).symlink_to(dag_file)
    return {**os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (
                database if "://" in database else pg_url(database)),
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            **settings}


def airflow(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """Run `airflow ARGS` to completion; its output (stdout and stderr), or an error with
    the output's tail."""
    done = subprocess.run([sys.executable, "-m", "airflow", *args], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"airflow {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout[-8000:]}")
    return done.stdout


def wait_until(check: Callable[[], T | None], timeout: float, what: str,
               diagnose: Callable[[], str] = lambda: "", interval: float = 2.0) -> T:
    """Poll `check` until it returns something truthy; on timeout fail with `diagnose()`."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                 f"{diagnose()}")
        time.sleep(interval)


class Processes:
    """Long-running Airflow components, each in its own process group, logging to a file."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: dict[str, subprocess.Popen] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, env: dict[str, str], *args: str) -> subprocess.Popen:
        """Start `airflow ARGS` as `name` (again, after it was killed: its log goes on)."""
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=env,
                                       stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.started[name] = process
        return process

    def check_alive(self) -> None:
        """Fail (with the logs) if a component has exited."""
        dead = {n: p.returncode for n, p in self.started.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"Airflow components exited: {dead}\n{self.logs()}")

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for name in self.started:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace")
            parts.append(f"----- {name} (last {tail} chars) -----\n{text[-tail:]}")
        return "\n".join(parts)

    def stop(self, grace: float = 20, names: Iterable[str] | None = None) -> None:
        """SIGTERM every group (Celery warm shutdown, scheduler exit), or those of `names`,
        then SIGKILL leftovers."""
        chosen = [self.started.pop(n) for n in names] if names is not None else list(
            self.started.values())
        for process in chosen:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in chosen:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)  # children outliving their parent too
            process.wait()


def celery_settings(database: str, broker: int, api_port: int) -> dict[str, str]:
    """Airflow settings of a CeleryExecutor cluster on `database` with Redis db `broker`."""
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{broker}",
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + pg_url(database, "postgresql"),
        # workers report task states to the api-server's Execution API, not to the DB
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
    }


def start_cluster(processes: Processes, env: dict[str, str], api_port: int,
                  workers: dict[str, str] | None = None) -> None:
    """api-server (Execution API only), scheduler, dag-processor, and a Celery worker per
    entry of `workers` (name -> queue; default: one on `default`, one on `gpu`)."""
    processes.start("api-server", env, "api-server", "--apps", "execution", "--host",
                    "127.0.0.1", "--port", str(api_port), "--workers", "1")
    processes.start("scheduler", env, "scheduler")
    processes.start("dag-processor", env, "dag-processor")
    if workers is None:
        workers = {"default-worker": "default", "gpu-worker": "gpu"}
    for name, queue in workers.items():
        start_worker(processes, env, name, queue)


def start_worker(processes: Processes, env: dict[str, str], name: str, queue: str,
                 **extra: str) -> None:
    """A Celery worker (one task at a time) on `queue`, reporting `name` as
    task_instance.hostname; `extra`: more environment for it alone."""
    worker_env = {**env, **extra, WORKER_NAME_VAR: name,
                  "AIRFLOW__CORE__HOSTNAME_CALLABLE": "support.production.worker_hostname",
                  "PYTHONPATH": f"{TESTS}:{env.get('PYTHONPATH', '')}".rstrip(":")}
    # --skip-serve-logs: two workers on one machine would both bind port 8793
    processes.start(name, worker_env, "celery", "worker", "-q", queue, "--concurrency", "1",
                    "--celery-hostname", f"{name}@odapi-test", "--skip-serve-logs")


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def worker_hostname() -> str:
    """`[core] hostname_callable` for workers sharing one machine: the name each was started
    with, so task_instance.hostname tells them apart (the default, getfqdn, does not).
    Imported inside workers: this module must stay free of import-time side effects."""
    return os.environ[WORKER_NAME_VAR]


def task_logs(home: Path, dag_id: str, task_ids: Iterable[str], tail: int = 3000) -> str:
    """The end of each attempt's log of `task_ids` under AIRFLOW_HOME/logs."""
    return "\n".join(f"----- {path.relative_to(home)} -----\n"
                     f"{path.read_text(errors='replace')[-tail:]}"
                     for task_id in task_ids
                     for path in sorted((home / "logs").glob(
                         f"dag_id={dag_id}/*/task_id={task_id}/*.log")))
