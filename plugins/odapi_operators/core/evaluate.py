"""Evaluate stage (TensorFlow; child process): COCO metrics of a checkpoint on the val split.

Uses the task's own evaluator (TF-Vision's COCO evaluator over pycocotools), with ground
truth read from the TFRecords, and writes `metrics.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from odapi_operators.core import storage, tfvision

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10", "ARmax100",
             "ARs", "ARm", "ARl")


def evaluate(model_dir: str | Path, data_dir: str | Path, out_file: str | Path) -> dict:
    tfvision.setup_tensorflow()
    import tensorflow as tf
    from official.core import task_factory, train_utils

    params = tfvision.load_params(model_dir)
    data = tfvision.read_data_summary(data_dir)
    val = data["splits"].get("val", {})
    if not val.get("images"):
        raise ValueError(f"{data_dir}: the val split is empty; nothing to evaluate on")
    if data["num_classes"] + 1 != params.task.model.num_classes:
        raise ValueError(f"{data_dir}: {data['num_classes']} classes, but the model in "
                         f"{model_dir} was trained for {params.task.model.num_classes - 1}")
    params.override({"task": {"validation_data": {"input_path": val["pattern"]}}})
    checkpoint = tfvision.latest_checkpoint(model_dir)
    task = task_factory.get_task(params.task, logging_dir=str(Path(out_file).parent))
    trainer = train_utils.create_trainer(params, task, train=False, evaluate=True)
    trainer.checkpoint.read(checkpoint).expect_partial()
    logs = trainer.evaluate(tf.convert_to_tensor(-1, dtype=tf.int32))
    metrics = {key: float(value) for key, value in logs.items()
               if key in COCO_KEYS or key.endswith("loss")}
    metrics = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
    result = {**metrics, "checkpoint": checkpoint, "eval_images": val["images"]}
    storage.write_text(out_file, json.dumps(result, indent=2))
    return {**result, "metrics": str(out_file)}
