"""Train stage (TensorFlow; runs in a child process): TF-Vision `run_experiment` in train mode.

Checkpoints go to the model dir; a re-run with the same model dir resumes from the newest
checkpoint (Orbit restores it) instead of starting over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from odapi_operators.core import storage, tfvision


def train(model_config: str | Path, data_dir: str | Path, model_dir: str | Path,
          steps: int, batch_size: int = 8) -> dict:
    tfvision.setup_tensorflow()
    from official.core import task_factory, train_lib

    experiment, _ = tfvision.load_model_config(model_config)
    params = tfvision.build_params(model_config, data_dir, steps, batch_size)
    tfvision.save_params(params, experiment, model_dir, model_config=str(model_config),
                         data=str(data_dir))
    strategy = tfvision.distribution_strategy()
    started = time.monotonic()
    with strategy.scope():
        task = task_factory.get_task(params.task, logging_dir=str(model_dir))
    model, _ = train_lib.run_experiment(distribution_strategy=strategy, task=task, mode="train",
                                        params=params, model_dir=str(model_dir))
    checkpoint = tfvision.latest_checkpoint(model_dir)
    summary = {"model_dir": str(model_dir), "checkpoint": checkpoint,
               "steps": int(checkpoint.rsplit("-", 1)[-1]), "experiment": experiment,
               "seconds": round(time.monotonic() - started, 1),
               "parameters": int(model.count_params())}
    storage.write_text(Path(model_dir) / "summary.json", json.dumps(summary, indent=2))
    return summary
