"""Train stage (TensorFlow; runs in a child process): TF-Vision `run_experiment` in train mode.

Checkpoints go to the model dir; a re-run with the same model dir resumes from the newest
checkpoint (Orbit restores it) instead of starting over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from odapi_operators.core import storage
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.model import tfvision, warm_start


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


def train(model_config: str | Path, data_dir: str | Path, model_dir: str | Path,
          steps: int, batch_size: int, *, init_checkpoint: str | None = None,
          warm_start_from: str | None = None) -> dict:
    """Train (or resume) in `model_dir`; a new run starts from `init_checkpoint`, from the
    production model under `warm_start_from` (`<serving base>/<model>`), or from scratch."""
    start = warm_start.resolve(init_checkpoint, warm_start_from)
    tfvision.setup_tensorflow()
    from official.core import task_factory, train_lib

    from odapi_operators.core.model.runtime import apply_runtime

    experiment, _ = tfvision.load_model_config(model_config)
    params = tfvision.build_params(model_config, data_dir, steps, batch_size)
    tfvision.save_params(params, experiment, model_dir, model_config=str(model_config),
                         data=str(data_dir))
    apply_runtime(params)
    strategy = tfvision.distribution_strategy()
    started = time.monotonic()
    with strategy.scope():
        task = task_factory.get_task(params.task, logging_dir=str(model_dir))
    resumed = _checkpoint_step(model_dir)
    started_from = ({"from": "resumed", "step": resumed} if resumed
                    else warm_start.install(task, start["checkpoint"]))
    progress = ProgressLine(resumed, steps, params.trainer.steps_per_loop,
                            emit=lambda line: print(line, flush=True))
    model, _ = train_lib.run_experiment(distribution_strategy=strategy, task=task, mode="train",
                                        params=params, model_dir=str(model_dir),
                                        train_actions=[progress])
    checkpoint = tfvision.latest_checkpoint(model_dir)
    summary = {"model_dir": str(model_dir), "checkpoint": checkpoint,
               "steps": tfvision.checkpoint_step(checkpoint), "resumed_from_step": resumed,
               "start": {**start, **started_from},
               "experiment": experiment,
               "seconds": round(time.monotonic() - started, 1),
               "parameters": int(model.count_params()),
               "losses": progress.losses}
    storage.write_text(Path(model_dir) / SUMMARY, json.dumps(summary, indent=2))
    return summary
