"""One detector interface over a training checkpoint and an exported SavedModel (TensorFlow).

`load_detector(path)` accepts a model dir written by `odapi train` (its newest checkpoint,
restored into TF-Vision's export module in memory), an export folder, a SavedModel folder or
a TF Serving version folder. Both kinds run the same export-module graph, so they return the
same detections for the same weights: that is what lets the gate compare a candidate
checkpoint with the SavedModel in production on equal terms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from odapi_operators.core import storage, tfvision



@dataclass
class Detections:
    """Detections for one image: boxes normalized [ymin, xmin, ymax, xmax] to the image."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


@dataclass
class Detector:
    kind: str  # "checkpoint" | "saved_model"
    path: str  # the checkpoint or SavedModel folder actually loaded
    input_type: str  # what `detect` is fed: image_tensor | image_bytes | tf_example
    normalized: bool | None  # boxes normalized to the original image (None: unknown)
    run: Callable  # batch-of-one inputs tensor -> output dict

    def detect(self, example: bytes) -> Detections:
        """Detect on one serialized tf.train.Example (its `image/encoded` image)."""
        import tensorflow as tf

        from odapi_operators.core.export import request_input

        array = request_input(example, self.input_type)
        tensor = tf.constant(array, dtype=tf.string if array.dtype == object else tf.uint8)
        outputs = self.run(tensor)
        count = int(np.asarray(outputs["num_detections"]).reshape(-1)[0])
        boxes = np.asarray(outputs["detection_boxes"])[0][:count].astype(np.float64)
        if not self.normalized:
            boxes = _normalize(boxes, np.asarray(outputs["image_info"])[0])
        return Detections(boxes=np.clip(boxes, 0.0, 1.0),
                          scores=np.asarray(outputs["detection_scores"])[0][:count],
                          classes=np.asarray(outputs["detection_classes"])[0][:count].astype(int))


def _normalize(boxes: np.ndarray, image_info: np.ndarray) -> np.ndarray:
    """Boxes in the resized input frame -> normalized to the original image.

    image_info rows: original [h, w], desired [h, w], scale [y, x], offset [y, x].
    """
    (height, width), _, (scale_y, scale_x) = image_info[0], image_info[1], image_info[2]
    return boxes / np.array([scale_y * height, scale_x * width, scale_y * height,
                             scale_x * width])


def saved_model_dir(path: str | Path) -> Path | None:
    """The SavedModel folder at or under `path` (export folder or Serving version)."""
    for candidate in (Path(path), Path(path) / "saved_model"):
        if (candidate / "saved_model.pb").is_file():
            return candidate
    return None


def _load_checkpoint(model_dir: str | Path) -> Detector:
    import tensorflow as tf
    from official.vision.serving import detection

    params = tfvision.load_params(model_dir)
    checkpoint = tfvision.latest_checkpoint(model_dir)
    module = detection.DetectionModule(params=params, batch_size=None,
                                       input_image_size=list(params.task.model.input_size[:2]),
                                       input_type="image_tensor", num_channels=3)
    tf.train.Checkpoint(model=module.model).read(checkpoint).expect_partial()

    def run(tensor):  # a closure: the tf.function method holds its module only weakly
        return module.inference_from_image_tensors(tensor)

    return Detector("checkpoint", checkpoint, "image_tensor",
                    bool(params.task.export_config.output_normalized_coordinates), run)


def _saved_model_info(saved_model: Path) -> tuple[str | None, bool | None]:
    """(input type, normalized outputs) from our assets.extra files, when present."""
    from odapi_operators.core.export import EXPORT_INFO

    extra = saved_model / "assets.extra"
    input_type = normalized = None
    if (extra / EXPORT_INFO).is_file():
        input_type = json.loads(storage.read_text(extra / EXPORT_INFO)).get("input_type")
    if (extra / "params.yaml").is_file():
        params = yaml.safe_load(storage.read_text(extra / "params.yaml")) or {}
        export_config = (params.get("task") or {}).get("export_config") or {}
        normalized = bool(export_config.get("output_normalized_coordinates", False))
    return input_type, normalized


def _load_saved_model(saved_model: Path) -> Detector:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model), tags=["serve"])
    signature = loaded.signatures["serving_default"]
    input_type, normalized = _saved_model_info(saved_model)
    if input_type is None:
        spec = signature.structured_input_signature[1]["inputs"]
        input_type = "image_tensor" if spec.dtype == tf.uint8 else "image_bytes"

    def run(tensor):
        return signature(inputs=tensor)

    run.loaded = loaded  # keep the loaded object (and its variables) alive
    return Detector("saved_model", str(saved_model), input_type, normalized, run)


def load_detector(path: str | Path) -> Detector:
    """A detector from a model dir (newest checkpoint) or a SavedModel/export/version dir."""
    tfvision.setup_tensorflow()
    saved_model = saved_model_dir(path)
    if saved_model is not None:
        return _load_saved_model(saved_model)
    if (Path(path) / tfvision.TRAIN_INFO).is_file():
        return _load_checkpoint(path)
    raise FileNotFoundError(f"{path}: neither a model dir written by `odapi train` nor a "
                            "SavedModel (no saved_model.pb)")
