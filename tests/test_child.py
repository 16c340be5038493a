"""Stage child processes: a worker killed with SIGKILL, or a task killed by Airflow
(`on_kill`), leaves no stage process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.processes import children, descendants, gone, kill_session

SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _child_pid(pid_file: Path) -> int:
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    return int(pid_file.read_text())


def _gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_a_worker_killed_with_sigkill_takes_its_stage_child_along(tmp_path):
    pid_file = tmp_path / "child.pid"
    worker = subprocess.Popen([sys.executable, "-c", (
        "import sys; from odapi_operators.core.stages.child import stream; "
        f"stream([sys.executable, '-c', {SLEEPER!r}, {str(pid_file)!r}], print)")],
        stdout=subprocess.DEVNULL)
    child = _child_pid(pid_file)
    assert _alive(child)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert _gone(child), "the stage child outlived its killed worker"


def test_terminate_children_ends_the_whole_group(tmp_path):
    """`StageOperator.on_kill`: the child and what it started (a pool) end together."""
    import threading

    from odapi_operators.core.stages.child import stream, terminate_children

    pid_file, grandchild_file = tmp_path / "child.pid", tmp_path / "grandchild.pid"
    script = ("import subprocess, sys; "
              f"subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, {str(grandchild_file)!r}]); "
              f"exec({SLEEPER!r})")
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(code=stream(
        [sys.executable, "-c", script, str(pid_file)], lambda line: None)[0]))
    runner.start()
    child, grandchild = _child_pid(pid_file), _child_pid(grandchild_file)
    terminate_children()
    runner.join(30)
    assert done["code"] == -signal.SIGTERM
    assert _gone(child) and _gone(grandchild), "a process of the stage survived on_kill"
    assert os.getpgid(os.getpid()) != child  # the group was the child's, not ours


def _fetched_sample(root: Path) -> tuple[Path, str]:
    """A pipeline (verify: two decoder workers, a resize for each image) and a fetched
    manifest of sample images: enough work that the verify pool runs for a while."""
    from odapi_operators.core.data.fetch import fetch_images
    from odapi_operators.core.data.ingest import ingest
    from odapi_operators.core.data.sample_data import generate

    generate(root / "export", count=120, seed=5, max_side=400)
    ingest([str(root / "export")], root / "ingest")
    fetched = fetch_images(root / "ingest" / "manifest.jsonl", root / "images")
    pipeline = root / "pipeline.yaml"
    pipeline.write_text(json.dumps({
        "home": str(root), "exports": {"path": str(root / "export")}, "images": {"workers": 2, "max_side": 64},
        "train": {"model_config": "m.yaml", "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    return pipeline, fetched["manifest"]


def _stage_child_with_pool(worker: subprocess.Popen) -> tuple[int, list[int]]:
    """The worker's stage child and its pool, as soon as the pool has started."""
    while worker.poll() is None:
        for child in children(worker.pid):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            pool = children(child)
            if b"odapi_operators" in cmdline and pool:
                return child, pool
        time.sleep(0.002)
    raise AssertionError(f"the worker ended ({worker.returncode}) before its stage child had "
                         "started a pool")


def test_a_worker_killed_with_sigkill_takes_the_stage_and_its_pool_along(tmp_path):
    """`run_stage_in_child` in a worker that is SIGKILLed mid-stage: the stage child and the
    pool it started end too (a death signal alone reaches only the direct child)."""
    pipeline, manifest = _fetched_sample(tmp_path)
    worker = subprocess.Popen([sys.executable, "-c", (
        "import sys; from odapi_operators.core.stages.runner import run_stage_in_child; "
        "run_stage_in_child('verify', pipeline=sys.argv[1], run_id='r1', "
        "inputs={'manifest': sys.argv[2]}, log=lambda line: None)"), str(pipeline), manifest])
    child = None
    try:
        child, pool = _stage_child_with_pool(worker)
        os.kill(child, signal.SIGSTOP)  # frozen mid-stage with its pool: the kill lands there
        stage = [child, *descendants(child)]
        assert set(pool) <= set(stage)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert gone(stage, seconds=5) == [], "a process of the stage outlived its worker"
    finally:
        worker.kill()
        if child is not None:
            kill_session(child)
