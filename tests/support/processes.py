"""Process trees read from /proc: what a test checks after it kills a process with SIGKILL."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (state, ppid, pgrp, session, ...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Running (a zombie has exited: only its parent has not reaped it yet)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    """Living direct children of `pid`."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return [child for child in found if alive(child)]


def descendants(pid: int) -> list[int]:
    """Living children, grandchildren, ... of `pid`."""
    found, todo = [], children(pid)
    while todo:
        found.append(todo.pop())
        todo += children(found[-1])
    return found


def in_session(session: int) -> list[int]:
    """Living processes of a session: what is left of a process started with
    start_new_session=True (and its pools) after it was killed and its children reparented."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[3]) == session:
                members.append(int(entry.name))
    return members


def gone(pids: list[int], seconds: float = 10) -> list[int]:
    """Wait up to `seconds` for `pids` to end; the ones still alive."""
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def kill_session(session: int) -> None:
    """Clean-up after a test: SIGKILL whatever is left of a session."""
    for pid in in_session(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until_signalled(proc, signal_file: Path, what: str, timeout: float = 60) -> None:
    """Return once `proc` (a Popen) has created `signal_file` (a testpoint reached); fail if
    it exits first or never gets there."""
    import pytest

    deadline = time.monotonic() + timeout
    while not signal_file.exists():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.02)


def kill_when_signalled(proc, signal_file: Path, what: str, timeout: float = 60) -> None:
    """SIGKILL `proc` (a Popen) once it has created `signal_file` (a testpoint reached), and
    reap it; fail if it exits first or never gets there."""
    wait_until_signalled(proc, signal_file, what, timeout)
    proc.kill()
    proc.wait()
