"""Stage child processes: a worker killed with SIGKILL, or a task killed by Airflow
(`on_kill`), leaves no stage process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
