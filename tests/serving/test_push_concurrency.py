"""Crash consistency of the serving side: `odapi push` processes racing each other and killed
at seeded moments, on tiny fake SavedModels (no TensorFlow).

What must hold whatever happens: every push either succeeds with a version that was really
made stable, or fails cleanly (an exit status that says why, nothing of it left on disk); no
numeric version folder without saved_model.pb; models.config always parses and serves what
its labels name; `stable` names a complete version; the registry records every move, each
from the version the one before moved to. A killed push's re-run completes and leaves no
temporary file or folder behind.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from odapi_operators.core.failures import EXIT_CODES, Failure
from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving import registry
from odapi_operators.core.serving.models_config import STABLE, ServingOptions
from odapi_operators.core.serving.publish import push_and_promote
from odapi_operators.core.serving.serving_dir import RUN_MARKER, model_lock, versions
from odapi_operators.core.testpoints import ENV as PAUSE_ENV
from odapi_operators.core.testpoints import SIGNAL_ENV

from support.fakes import fake_saved_model
from support.processes import kill_when_signalled

SEED = int(os.environ.get("ODAPI_CRASH_SEED", "18"))
KILL_POINTS = ("push:copying", "push:before_rename", "models_config:writing",
               "push:before_promote", "models_config:between_steps", "registry:appending",
               "push:deleting")
POLICIES = {"labelled": [], "latest": ["--latest-versions", "2"]}


def source(tmp_path: Path, run_id: str) -> Path:
    """A fake export in `<run_id>/saved_model`: the push takes its run id from the folder."""
    path = tmp_path / "runs" / run_id / "saved_model"
    return path if path.exists() else fake_saved_model(path, run_id)


def odapi(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "odapi_operators", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def start_push(saved_model: Path, serving: Path, policy: str, env: dict | None = None):
    return odapi("push", "--saved-model", str(saved_model), "--base", str(serving),
                 "--model-name", "shapes", "--keep-versions", "1", "--version-policy", policy,
                 *POLICIES[policy], "--out", str(saved_model.parent / "push"), env=env)


def start_rollback(serving: Path, policy: str) -> subprocess.Popen:
    return odapi("rollback", "--base", str(serving), "--model-name", "shapes", "--reason",
                 "racing", "--version-policy", policy, *POLICIES[policy])


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def stable_moves(serving: Path) -> list[dict]:
    return [r for r in registry.read(serving / "registry.jsonl")
            if r["kind"] == "label" and r["label"] == STABLE]


def assert_serving_whole(serving: Path, *, recorded: bool = True) -> None:
    """What Serving and the next run may rely on at any moment (`recorded`: and the registry
    has caught up with the last move, i.e. no push is half done)."""
    model_dir = serving / "shapes"
    complete = versions(model_dir)
    numeric = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    assert numeric == complete, "a version folder without saved_model.pb"
    entry = serving_config.entry(serving_config.read(serving / "models.config"), "shapes")
    labels = serving_config.labels(entry)
    assert set(labels.values()) <= set(complete), f"a label names a missing version: {labels}"
    assert set(labels.values()) <= set(serving_config.served(entry, complete))
    moves = stable_moves(serving)
    for before, after in zip(moves, moves[1:]):
        assert after["previous"] == before["version"], f"a move went unrecorded: {moves}"
    if recorded and STABLE in labels:
        assert moves[-1]["version"] == labels[STABLE]


def assert_no_leftovers(serving: Path) -> None:
    temporary = [p.name for folder in (serving, serving / "shapes") for p in folder.iterdir()
                 if p.name.startswith(".tmp-")]
    assert temporary == []


# --- issue #18.3: a push waiting for its promotion keeps its version -----------------------------


def test_a_push_waiting_for_its_promotion_keeps_its_version(tmp_path):
    """Run A is frozen between its push and its label move; run B pushes meanwhile. B must wait:
    before, B's policy update dropped A's version and B's keep-1 cleanup deleted it."""
    serving = tmp_path / "serving"
    options = ServingOptions(keep_versions=1)
    push_and_promote(source(tmp_path, "r1"), serving, "shapes", "r1", options)
    signal = tmp_path / "a-pushed"
    a = start_push(source(tmp_path, "r2"), serving, "labelled",
                   env={PAUSE_ENV: "push:before_promote", SIGNAL_ENV: str(signal)})
    try:
        deadline = time.monotonic() + 60
        while not signal.exists():
            assert a.poll() is None, a.communicate()
            assert time.monotonic() < deadline, "push never reached push:before_promote"
            time.sleep(0.02)
        b = threading.Thread(target=push_and_promote, daemon=True,
                             args=(source(tmp_path, "r3"), serving, "shapes", "r3", options))
        b.start()
        b.join(3)  # in process: without the lock it is done in milliseconds
        assert b.is_alive(), "run B pushed while run A held its version unpromoted"
        assert versions(serving / "shapes") == [1, 2]
        entry = serving_config.entry(serving_config.read(serving / "models.config"), "shapes")
        assert serving_config.served(entry, [1, 2]) == [1, 2]
    finally:
        a.kill()
        a.wait()
    b.join(30)  # A died: B goes on, and may drop A's never-promoted version
    assert not b.is_alive()
    assert_serving_whole(serving)
    assert [m["version"] for m in stable_moves(serving)] == [1, 3]


# --- 8 pushes (and 2 rollbacks) at once ------------------------------------------------------


def wait_queued(lock: Path, procs: list[subprocess.Popen], timeout: float = 60) -> None:
    """Until every process waits for the flock on `lock` (/proc/locks marks waiters '->'), or
    one has exited (its result tells why)."""
    inode = f":{lock.stat().st_ino} "
    deadline = time.monotonic() + timeout
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        locks = Path("/proc/locks").read_text().splitlines()
        if sum("->" in line and inode in line for line in locks) >= len(procs):
            return
        time.sleep(0.05)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_eight_concurrent_pushes_each_end_stable_or_fail_cleanly(tmp_path, policy):
    serving = tmp_path / "serving"
    options = ServingOptions(keep_versions=1, version_policy=policy)
    for run in ("r0", "r1"):  # a stable and a previous one: every rollback has work to do
        push_and_promote(source(tmp_path, run), serving, "shapes", run, options)
    runs = [f"r{i}" for i in range(2, 10)]
    sources = {run: source(tmp_path, run) for run in runs}
    with model_lock(serving / "shapes"):  # all ten queue up, then race for it in any order
        pushes = {run: start_push(sources[run], serving, policy) for run in runs}
        rollbacks = [start_rollback(serving, policy) for _ in range(2)]
        wait_queued(serving / "shapes" / ".odapi.lock", [*pushes.values(), *rollbacks])
    results = {run: finish(proc) for run, proc in pushes.items()}
    rolled = [finish(proc) for proc in rollbacks]

    print(policy, {run: code for run, (code, _, _) in results.items()},  # shown with -s
          "rollbacks:", [code for code, _, _ in rolled])
    assert_serving_whole(serving)
    assert_no_leftovers(serving)
    moves = stable_moves(serving)
    promoted = {m["reason"].rsplit(" ", 1)[-1]: m["version"] for m in moves
                if m["action"] == "promote"}
    for run, (code, out, err) in results.items():
        if code == 0:  # it made its version stable, and says which one
            version = json.loads(out)["version"]
            assert promoted[run] == version and json.loads(out)["stable"] == version
        else:  # only a push after a rollback under `latest` may be refused, and nothing is left
            assert (policy, code) == ("latest", EXIT_CODES[Failure.CONFIG]), err
            assert "would stop serving stable" in err and run not in promoted
            assert not any((p / RUN_MARKER).exists() and run in (p / RUN_MARKER).read_text()
                           for p in (serving / "shapes").iterdir())
    assert len(set(promoted.values())) == len(promoted)  # distinct versions
    if policy == "labelled":
        assert sorted(promoted) == ["r0", "r1", *runs]
    for code, _, err in rolled:  # a rollback moves stable back, or says why it cannot
        assert code in (0, EXIT_CODES[Failure.REFUSED], EXIT_CODES[Failure.CONFIG]), err
    assert len(moves) == len(promoted) + sum(code == 0 for code, _, _ in rolled)
    assert any(code == 0 for code, _, _ in rolled)


# --- SIGKILL at seeded moments, then the re-run ------------------------------------------------


def test_pushes_killed_at_seeded_moments_leave_serving_whole_and_reruns_complete(tmp_path):
    rng = random.Random(SEED)
    serving = tmp_path / "serving"
    for run in ("r1", "r2"):  # something to keep, to garbage-collect and to move from
        assert finish(start_push(source(tmp_path, run), serving, "labelled"))[0] == 0
    points = rng.sample(KILL_POINTS, len(KILL_POINTS))
    for number, point in enumerate(points, 3):
        run, policy = f"r{number}", rng.choice(sorted(POLICIES))
        signal = tmp_path / f"paused-{run}"
        killed = start_push(source(tmp_path, run), serving, policy,
                            env={PAUSE_ENV: point, SIGNAL_ENV: str(signal)})
        kill_when_signalled(killed, signal, f"push {point}")
        assert_serving_whole(serving, recorded=False)  # Serving is safe even now

        code, out, err = finish(start_push(source(tmp_path, run), serving, policy))
        assert code == 0, f"seed {SEED}, re-run of {run} after a kill at {point}: {err}"
        assert_serving_whole(serving)
        assert_no_leftovers(serving)
        assert stable_moves(serving)[-1]["version"] == json.loads(out)["version"]
    assert len(stable_moves(serving)) == 2 + len(points)
