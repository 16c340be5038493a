"""Multi-worker training: two CPU worker processes on 127.0.0.1, one TF_CONFIG cluster, the
same `odapi train` command; worker 0 (the chief) owns the model dir."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from odapi_operators.core.model import cluster

from conftest import free_port, odapi, tiny_model_config

# --- who is the chief (no TensorFlow) ---------------------------------------------------------


def test_without_tf_config_a_process_trains_alone_as_its_own_chief():
    assert cluster.role({}) == cluster.ClusterRole(workers=1)
    assert cluster.role({}).is_chief


def test_worker_0_is_the_chief_unless_the_cluster_names_one():
    hosts = ["a:1", "b:2"]
    assert cluster.role({"TF_CONFIG": cluster.tf_config(hosts, 0)}).is_chief
    assert not cluster.role({"TF_CONFIG": cluster.tf_config(hosts, 1)}).is_chief
    named = {"cluster": {"chief": ["c:0"], "worker": hosts}, "task": {"type": "worker",
                                                                      "index": 0}}
    worker = cluster.role({"TF_CONFIG": json.dumps(named)})
    assert (worker.workers, worker.is_chief) == (3, False)
    named["task"] = {"type": "chief", "index": 0}
    assert cluster.role({"TF_CONFIG": json.dumps(named)}).is_chief


@pytest.mark.parametrize("raw, reason", [
    ("{not json", "not a cluster spec"),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}),
     "task worker 1 is not in the cluster"),
    (json.dumps({"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": {"type": "ps",
                                                                          "index": 0}}),
     "runs chief/worker tasks"),
])
def test_a_bad_tf_config_is_a_config_error_naming_it(raw, reason):
    with pytest.raises(cluster.ClusterConfigError, match=reason) as caught:
        cluster.role({"TF_CONFIG": raw})
    assert caught.value.failure.value == "config"


def test_a_job_pod_without_its_index_is_refused():
    with pytest.raises(cluster.ClusterConfigError, match="JOB_COMPLETION_INDEX"):
        cluster.configure_from_job({cluster.HOSTS_ENV: "a:1,b:2"})


# --- two real workers -------------------------------------------------------------------------



@contextlib.contextmanager
def _workers(records: Path, model_dir: Path, model_config: Path, steps: int,
             scratch: Path, count: int = 2) -> Iterator[list[subprocess.Popen]]:
    """`count` processes of one `odapi train` command, each told its task by TF_CONFIG;
    their temporary dirs go to `scratch` (to check a worker leaves none behind). Whatever
    still runs when the test ends is killed."""
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    scratch.mkdir(exist_ok=True)
    logs = [model_dir.parent / f"worker-{index}.log" for index in range(count)]
    processes = [subprocess.Popen(
        [sys.executable, "-u", "-m", "odapi_operators", "train", "--model-config",
         str(model_config), "--data", str(records), "--out", str(model_dir),
         "--steps", str(steps), "--batch-size", str(count)],
        stdout=logs[index].open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CONFIG": cluster.tf_config(hosts, index),
             "TMPDIR": str(scratch)}) for index in range(count)]
    for process, log in zip(processes, logs):
        process.log = log
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


# Two processes tracing the model at once on 2 cores take ~3 minutes quietly, many more on
# a loaded machine: the bounds are for a hang, not for speed.
FINISH_SECONDS = 1200


def _finish(processes: list[subprocess.Popen], timeout: float = FINISH_SECONDS) -> list[str]:
    """Wait for every worker to end; their outputs."""
    deadline = time.monotonic() + timeout
    for process in processes:
        process.wait(timeout=max(deadline - time.monotonic(), 1))
    return [process.log.read_text() for process in processes]


def _worker_dirs(scratch: Path) -> set[str]:
    """The non-chief workers' temporary checkpoint dirs in `scratch` (TensorFlow's autograph
    files beside them are its own)."""
    return {path.name for path in scratch.glob("odapi-worker-*")}


def _summary(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_workers_train_together_lose_one_resume_and_the_chiefs_checkpoint_evaluates(
        trained_model, tmp_path):
    """One cluster launch for both faults and the happy path (each launch traces the model
    in two processes: minutes on 2 cores): two workers train until the chief's first
    checkpoint, one is SIGKILLed, the chief fails naming it and the resume step; the retry
    of both resumes there, trains to the end in step, and only the chief wrote the model dir,
    whose checkpoint evaluates."""
    model_dir, steps = tmp_path / "model", 3
    model_config = tiny_model_config(tmp_path, steps_per_loop=1, summary_interval=1,
                                     checkpoint_interval=1)
    args = (trained_model["records"], model_dir, model_config, steps, tmp_path / "scratch")
    with _workers(*args) as (chief, worker):
        deadline = time.monotonic() + FINISH_SECONDS
        while not (model_dir / "checkpoint").exists():  # the chief saved step 1
            assert chief.poll() is None, chief.log.read_text()[-3000:]
            assert time.monotonic() < deadline, chief.log.read_text()[-3000:]
            time.sleep(0.5)
        worker.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        [output] = _finish([chief], timeout=300)
        noticed = time.monotonic() - killed
    assert chief.returncode == 1, output[-3000:]  # transient: Airflow retries it
    assert "training worker lost: worker 1 stopped answering worker 0" in output, output[-3000:]
    # the coordination service misses the peer's heartbeats within about a minute; a step in
    # flight on a starved machine adds its own time
    assert noticed < 240
    killed_at = max(int(p.name.split("-")[1].split(".")[0]) for p in model_dir.glob("ckpt-*.index"))
    assert 1 <= killed_at < steps
    assert f"a retry resumes from step {killed_at}" in output

    left_by_the_killed = _worker_dirs(tmp_path / "scratch")  # SIGKILL cleans up nothing
    with _workers(*args) as retry:
        outputs = _finish(retry)
    assert [w.returncode for w in retry] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    chief_summary, worker_summary = (_summary(out) for out in outputs)
    assert chief_summary["workers"] == {"count": 2, "replicas": 2, "this": "worker 0"}
    assert worker_summary["workers"]["this"] == "worker 1"
    for output, summary in zip(outputs, (chief_summary, worker_summary)):
        assert summary["resumed_from_step"] == killed_at and summary["steps"] == steps
        first = next(line for line in output.splitlines() if line.startswith("progress: step"))
        assert first.startswith(f"progress: step {killed_at + 1}/{steps}")
    assert chief_summary["checkpoint"] == str(model_dir / f"ckpt-{steps}")
    # in step: the same global batches' losses on both workers ([step, loss] pairs)
    assert [step for step, _ in chief_summary["losses"]] == [
        step for step, _ in worker_summary["losses"]]
    assert [loss for _, loss in chief_summary["losses"]] == pytest.approx(
        [loss for _, loss in worker_summary["losses"]])
    # only the chief wrote into the model dir: its summary, one events file per launch, no
    # worker temporaries anywhere
    assert json.loads((model_dir / "summary.json").read_text()) == chief_summary
    # events.out.tfevents.<time>.<host>.<pid>.<uid>.v2: every one written by a chief
    writers = {int(path.name.rsplit(".", 3)[1]) for path in (model_dir / "train").glob(
        "events.out.tfevents.*")}
    assert writers and writers <= {chief.pid, retry[0].pid}, writers
    assert (model_dir / f"ckpt-{steps}.index").exists()
    assert _worker_dirs(tmp_path / "scratch") == left_by_the_killed, "a worker left its dir"
    assert (model_dir / ".train.lock").read_text().startswith(f"{retry[0].pid} on ")

    done = odapi("evaluate", "--model", str(model_dir), "--data", str(trained_model["records"]),
                 "--out", str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["eval_images"] > 0 and "AP" in metrics, done.stdout[-2000:]
