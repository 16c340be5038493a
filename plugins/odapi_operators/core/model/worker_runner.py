"""How a non-chief worker of a multi-worker training runs: in step with the chief, writing
nothing the chief owns.

TF-Vision's runner already saves a non-chief worker's checkpoints to a temporary dir (every
worker must save, since reading some variables is a collective), but it also restores a
non-chief from that empty dir. A retried training would then start its workers at step 0 and
the chief at its checkpoint, and their loops would never meet. Here a worker restores the
chief's newest checkpoint, counts its checkpoint interval from the same step (checkpoints are
collective too), writes no summaries, and leaves no temporary dir behind.
Only import this in a process that may hold TensorFlow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import tensorflow as tf
from official.core import train_lib

from odapi_operators.core.model.tfvision import checkpoint_step


class _WorkerRunner(train_lib.OrbitExperimentRunner):
    def __init__(self, *, scratch: str, **kwargs: Any) -> None:
        self._scratch = scratch
        super().__init__(**kwargs)

    def _maybe_build_checkpoint_manager(self) -> tf.train.CheckpointManager:
        chief = tf.train.latest_checkpoint(self.model_dir)

        def restore_chief_or_initialize() -> None:
            if chief:
                self.trainer.checkpoint.restore(chief)
            else:
                self.trainer.initialize()

        return tf.train.CheckpointManager(
            self.trainer.checkpoint, directory=self._scratch, max_to_keep=1,
            step_counter=self.trainer.global_step,
            checkpoint_interval=self.params.trainer.checkpoint_interval,
            last_checkpoint_step=checkpoint_step(chief) if chief else None,
            init_fn=restore_chief_or_initialize)


def run_worker(*, strategy: tf.distribute.Strategy, task: Any, params: Any,
               model_dir: str | Path, train_actions: list) -> tf.Module:
    """Train as a non-chief worker of the chief training into `model_dir`; the model."""
    with tempfile.TemporaryDirectory(prefix="odapi-worker-") as scratch:
        runner = _WorkerRunner(scratch=scratch, distribution_strategy=strategy, task=task,
                               mode="train", params=params, model_dir=str(model_dir),
                               save_summary=False, train_actions=train_actions)
        model, _ = runner.run()
    return model
