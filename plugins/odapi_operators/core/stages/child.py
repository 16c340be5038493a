"""Run `python -m odapi_operators ...` in a child process and stream its output.

TensorFlow stages (and stages with process pools) run this way so the calling worker never
holds TensorFlow or GPU memory after the task. The child leads its own process group, and
`terminate_children` (an operator's `on_kill`) ends the whole group, pools included. A worker
killed with SIGKILL can clean nothing up, so two things outlive it for that case: on Linux the
child dies with its parent (PR_SET_PDEATHSIG), and a watchdog (a tiny process in a session of
its own) SIGKILLs the child's whole group once the worker is gone, so the pool workers and
anything else the stage started go too (a death signal reaches only the direct child). Pool
workers (`process_pool`) also die with their owner, so a stage killed on its own leaves
nothing writing into its folder while the re-run runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

from odapi_operators.core.failures import Failure, failure_from_exit

_RUNNING: set[subprocess.Popen] = set()


class ChildStageError(RuntimeError):
    """The child failed; `failure` is the kind it reported through its exit status."""

    def __init__(self, message: str, failure: Failure = Failure.TRANSIENT):
        super().__init__(message)
        self.failure = failure


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers are SIGKILLed when the process owning it dies.

    Without this, workers of a killed stage wait forever on their queue, after finishing
    (and writing out) the work already handed to them. Workers are forked (their parent must
    be the owner for the check below, whatever the interpreter's default start method), all
    by the thread that first submits: PR_SET_PDEATHSIG fires when that thread ends, so one
    thread creates, uses and shuts down the pool.
    """
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_pool_worker_start, initargs=(os.getpid(),))


def _pool_worker_start(owner: int) -> None:
    """Die with the owner; if it died before that took effect, leave at once."""
    _die_with_parent()
    if os.getppid() != owner:
        os._exit(1)


# Reads stdin: a byte is the worker's "the child is done"; end of file without one means the
# worker died, and the child's group (argv[1]) goes with it.
_WATCHDOG = """import os, signal, sys
if not sys.stdin.buffer.read(1):
    try:
        os.killpg(int(sys.argv[1]), signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


def _watch(group: int) -> subprocess.Popen:
    """Start the watchdog of process group `group`; only this process holds its stdin pipe,
    so the kernel closes it when we die, however we die."""
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(group)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _dismiss(watchdog: subprocess.Popen) -> None:
    """Tell the watchdog the child ended under our eyes: it exits without killing anything."""
    assert watchdog.stdin is not None
    try:
        watchdog.stdin.write(b".")
        watchdog.stdin.close()
    except BrokenPipeError:  # it died (killed along with something); nothing to dismiss
        pass
    watchdog.wait()


def run_child(args: list[str], log: Callable[[str], None],
              env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run `odapi <args>` in a child; stream its output to `log`; return its exit status
    and its last lines."""
    command = [sys.executable, "-u", "-m", "odapi_operators", *args]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_USE_LEGACY_KERAS": "1",
                 **(env or {})}
    return stream(command, log, child_env)


def stream(command: list[str], log: Callable[[str], None],
           env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run `command` as a child that dies with us, its own children too; stream its output;
    (status, last lines)."""
    log(f"running: {' '.join(command)}")
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, bufsize=1, start_new_session=True,
                          preexec_fn=_die_with_parent) as child:
        _RUNNING.add(child)
        watchdog = _watch(child.pid)
        try:
            assert child.stdout is not None
            for line in child.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                log(line)
            code = child.wait()
        finally:
            _RUNNING.discard(child)
            if child.poll() is None:  # the caller is being torn down: take the group along
                _kill_group(child)
            _dismiss(watchdog)
    return code, list(tail)


def run_json(args: list[str], log: Callable[[str], None]) -> dict:
    """`odapi <args>` in a child (any command: benchmarks and tools); its JSON summary."""
    code, tail = run_child(args, log)
    if code != 0:
        raise ChildStageError(f"odapi {args[0]} failed with exit code {code}:\n"
                              + "\n".join(tail), failure_from_exit(code))
    for line in reversed(tail):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ChildStageError(f"odapi {args[0]} printed no JSON summary")


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def terminate_children() -> None:
    """End every running child's process group (an Airflow task being killed)."""
    for child in list(_RUNNING):
        _kill_group(child)
