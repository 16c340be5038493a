"""Train stage (TensorFlow; runs in a child process): TF-Vision `run_experiment` in train mode.

Checkpoints go to the model dir; a re-run with the same model dir resumes from the newest
checkpoint (Orbit restores it) instead of starting over, and a re-run on a model dir that
already reached its steps trains nothing and returns the first run's summary. One trainer at a
time owns a model dir (`.train.lock`, holding its pid): two would interleave checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from odapi_operators.core import storage, testpoints
from odapi_operators.core.data.label_map import read_label_map
from odapi_operators.core.failures import Failure
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.model import cluster, tfvision, warm_start
from odapi_operators.core.model.saved_model import LABEL_MAP_FILE

LOCK = ".train.lock"


class TrainingInProgress(RuntimeError):
    """Another process is training into the same model dir. Transient: once it has ended, a
    retry resumes from (or returns) what it trained."""
    failure = Failure.TRANSIENT


class WorkerLost(RuntimeError):
    """A process of a multi-worker training stopped answering; the others cannot go on
    without it (every step is collective). Transient: the retry restarts all of them from the
    chief's newest checkpoint."""
    failure = Failure.TRANSIENT


class ProgressLine:
    """An Orbit train action printing one line per training loop: step, loss, steps/s, ETA.

    Airflow shows the child's output in the task log as it comes, so a long run stays
    readable without TensorBoard.
    """

    def __init__(self, start_step: int, total_steps: int, steps_per_loop: int,
                 emit: Callable[[str], None] = print) -> None:
        self.step, self.total, self.per_loop = start_step, total_steps, steps_per_loop
        self.emit = emit
        self.last = time.monotonic()
        self.losses: list[tuple[int, float]] = []  # (step, mean loss of the loop)

    def __call__(self, output: dict[str, Any]) -> None:
        now = time.monotonic()
        done = min(self.per_loop, self.total - self.step)
        self.step += done
        rate = done / max(now - self.last, 1e-9)
        self.last = now
        loss = output.get("total_loss", output.get("training_loss"))
        self.losses.append((self.step, float(loss)))
        eta = (self.total - self.step) / rate if rate else float("inf")
        self.emit(f"progress: step {self.step}/{self.total} | loss {float(loss):.4f} | "
                  f"{rate:.2f} steps/s | ETA {eta:.0f} s")


def _checkpoint_step(model_dir: str | Path) -> int:
    """Step of the newest checkpoint in `model_dir` (0 if none): where training resumes."""
    import tensorflow as tf

    newest = tf.train.latest_checkpoint(str(model_dir))
    return tfvision.checkpoint_step(newest) if newest else 0


@contextlib.contextmanager
def _own_model_dir(model_dir: str | Path) -> Iterator[None]:
    """Hold `<model_dir>/.train.lock` (with our pid and host) while training, or fail naming
    its holder. The kernel drops the lock when the holder dies, even by SIGKILL. An object
    store has no such lock: there, Airflow's one-try-at-a-time is the only guard."""
    if not storage.is_local(model_dir):
        yield
        return
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    path = Path(model_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's pid stays
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise TrainingInProgress(
                f"{model_dir}: another training owns this model dir (pid {holder}, lock "
                f"{path}); not training twice into one model dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)


_TRAINER_STATE = ("optimizer", "global_step", "save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH")


def _parameter_count(checkpoint: str) -> int:
    """The model's weights in a training checkpoint (what Keras' count_params says once the
    model is built): everything but the optimizer's slots and state and the step counters."""
    import tensorflow as tf

    return sum(tf.TensorShape(shape).num_elements()
               for name, shape in tf.train.list_variables(checkpoint)
               if name.split("/")[0] not in _TRAINER_STATE and "OPTIMIZER_SLOT" not in name)


def _finished(model_dir: str | Path, steps: int, start: dict, experiment: str,
              role: cluster.ClusterRole) -> dict:
    """The summary of a model dir whose newest checkpoint already reached `steps`: the first
    run's (pointing at this dir), or rebuilt from the checkpoint if the run died before
    writing it. Training again would run no step."""
    checkpoint = tfvision.latest_checkpoint(model_dir)
    step = tfvision.checkpoint_step(checkpoint)
    print(f"{model_dir}: already trained to step {step} (asked {steps}); nothing to train",
          file=sys.stderr, flush=True)
    path = Path(model_dir) / SUMMARY
    stored = json.loads(storage.read_text(path)) if path.exists() else {}
    if stored.get("steps") == step:
        return {**stored, "model_dir": str(model_dir), "checkpoint": checkpoint}
    summary = {"model_dir": str(model_dir), "checkpoint": checkpoint, "steps": step,
               "resumed_from_step": step, "start": {**start, "from": "resumed", "step": step},
               "experiment": experiment, "seconds": 0.0,
               "parameters": _parameter_count(checkpoint), "losses": []}
    if role.is_chief:
        storage.write_text(path, json.dumps(summary, indent=2))
    return summary


@contextlib.contextmanager
def _worker_loss_named(model_dir: str | Path, role: cluster.ClusterRole) -> Iterator[None]:
    """A collective aborted because a peer is gone (TensorFlow's coordination service misses
    its heartbeats) becomes WorkerLost, saying where the retry resumes."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.AbortedError, tf.errors.CancelledError) as exc:
        if role.workers == 1:
            raise
        # the message also names this worker's own devices: the lost one is another task
        tasks = re.findall(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)", exc.message or "")
        lost = next((f"{job} {task}" for job, task in tasks if f"{job} {task}" != role.name),
                    "a peer")
        raise WorkerLost(
            f"{model_dir}: training worker lost: {lost} stopped answering {role.name} "
            f"(of {role.workers}; {type(exc).__name__}); a retry resumes from step "
            f"{_checkpoint_step(model_dir)}") from None


def train(model_config: str | Path, data_dir: str | Path, model_dir: str | Path,
          steps: int, batch_size: int, *, init_checkpoint: str | None = None,
          warm_start_from: str | None = None, warm_start_steps: int | None = None,
          warm_start_lr_factor: float | None = None) -> dict:
    """Train (or resume) in `model_dir`; a new run starts from `init_checkpoint`, from the
    production model under `warm_start_from` (`<serving base>/<model>`), or from scratch.
    A start from production trains `warm_start_steps` (when given) instead of `steps`: it
    refines weights that already know the older labels. A start from any trained detector of
    ours fine-tunes with `warm_start_lr_factor` (when given; tfvision.fine_tune). Fails with
    TrainingInProgress while another process trains into `model_dir`."""
    start = warm_start.resolve(init_checkpoint, warm_start_from)
    if warm_start_steps and start.get("production_version") is not None:
        steps = warm_start_steps
        start = {**start, "step_budget": steps}
    experiment, _ = tfvision.load_model_config(model_config)
    cluster.configure_from_job()
    role = cluster.role()
    with _own_model_dir(model_dir) if role.is_chief else contextlib.nullcontext():
        testpoints.reached("train:owns_model_dir")
        tfvision.setup_tensorflow()
        if _checkpoint_step(model_dir) >= steps:
            return _finished(model_dir, steps, start, experiment, role)
        fine_tune = (warm_start_lr_factor
                     if warm_start.is_detector_checkpoint(start["checkpoint"]) else None)
        return _train(model_config, data_dir, model_dir, steps, batch_size, start, experiment,
                      role, fine_tune)


def _train(model_config: str | Path, data_dir: str | Path, model_dir: str | Path,
           steps: int, batch_size: int, start: dict, experiment: str,
           role: cluster.ClusterRole, fine_tune: float | None) -> dict:
    from official.core import task_factory, train_lib

    from odapi_operators.core.model.runtime import apply_runtime

    params = tfvision.build_params(model_config, data_dir, steps, batch_size)
    if fine_tune:
        tfvision.fine_tune(params, fine_tune)
    start = {**start, "learning_rate": tfvision.learning_rate_record(params, fine_tune)}
    label_map = tfvision.read_data_summary(data_dir)["label_map"]
    if role.is_chief:  # the chief alone writes the model dir
        tfvision.save_params(params, experiment, model_dir, model_config=str(model_config),
                             data=str(data_dir))
        storage.write_text(Path(model_dir) / LABEL_MAP_FILE, storage.read_text(label_map))
    apply_runtime(params)
    strategy = tfvision.distribution_strategy()
    started = time.monotonic()
    with strategy.scope():
        task = task_factory.get_task(params.task, logging_dir=str(model_dir))
    resumed = _checkpoint_step(model_dir)
    started_from = ({"from": "resumed", "step": resumed} if resumed
                    else warm_start.install(task, start["checkpoint"],
                                            read_label_map(label_map), strategy))
    progress = ProgressLine(resumed, steps, params.trainer.steps_per_loop,
                            emit=lambda line: print(line, flush=True))
    with _worker_loss_named(model_dir, role):
        if role.is_chief:
            model, _ = train_lib.run_experiment(distribution_strategy=strategy, task=task,
                                                mode="train", params=params,
                                                model_dir=str(model_dir),
                                                train_actions=[progress])
        else:
            from odapi_operators.core.model.worker_runner import run_worker

            model = run_worker(strategy=strategy, task=task, params=params,
                               model_dir=model_dir, train_actions=[progress])
    checkpoint = str(Path(model_dir) / f"ckpt-{progress.step}")
    if role.is_chief:
        checkpoint = tfvision.latest_checkpoint(model_dir)
    summary = {"model_dir": str(model_dir), "checkpoint": checkpoint,
               "steps": tfvision.checkpoint_step(checkpoint), "resumed_from_step": resumed,
               "start": {**start, **started_from},
               "experiment": experiment,
               "seconds": round(time.monotonic() - started, 1),
               "parameters": int(model.count_params()),  # built: at least one step ran
               "losses": progress.losses}
    if role.workers > 1:
        summary["workers"] = {"count": role.workers, "replicas": strategy.num_replicas_in_sync,
                              "this": role.name}
    if role.is_chief:
        storage.write_text(Path(model_dir) / SUMMARY, json.dumps(summary, indent=2))
    return summary
