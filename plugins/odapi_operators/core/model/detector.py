"""One detector interface over a training checkpoint and an exported SavedModel (TensorFlow).

`load_detector(path)` accepts a model dir written by `odapi train` (its newest checkpoint,
restored into our export module, `export_module.py`, in memory), an export folder, a
SavedModel folder or a TF Serving version folder. Both kinds run the same export-module graph,
so they return the same detections for the same weights: that is what lets the gate compare a
candidate checkpoint with the SavedModel in production on equal terms.

`detect` takes a serialized tf.train.Example (what the records hold); `detect_images` takes
encoded images in batches (pre-annotation). `image_batches` and `unbatch` build a batch's
`inputs` and split its outputs, for a local model and a TF Serving answer alike.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from PIL import Image

from odapi_operators.core import storage
from odapi_operators.core.model import tfvision


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
    normalized: bool | None  # pre-contract SavedModels only: boxes normalized (None: unknown)
    run: Callable  # batch-of-one inputs tensor -> output dict
    # a checkpoint's export module, weights restored: an export in the same process reuses
    # its trace (evaluation's export ahead, model/stages.py)
    module: object | None = None

    def detect(self, example: bytes) -> Detections:
        """Detect on one serialized tf.train.Example (its `image/encoded` image)."""
        from odapi_operators.core.model.saved_model import request_input

        return unbatch(self.run(_tensor(request_input(example, self.input_type))),
                       self.normalized)[0]

    def detect_images(self, images: list[bytes]) -> list[Detections]:
        """Detect on encoded images (JPEG/PNG/GIF/BMP bytes): one model call per image size
        among them (`image_batches`), so graph and batched NMS run once for many images."""
        results: list[Detections | None] = [None] * len(images)
        for indices, array in image_batches(images, self.input_type):
            for index, found in zip(indices, unbatch(self.run(_tensor(array)), self.normalized)):
                results[index] = found
        return results  # type: ignore[return-value]


def _tensor(array: np.ndarray):
    import tensorflow as tf

    return tf.constant(array, dtype=tf.string if array.dtype == object else tf.uint8)


def image_batches(images: list[bytes], input_type: str) -> list[tuple[list[int], np.ndarray]]:
    """(indices into `images`, `inputs` array) per model call for encoded images.

    One call per distinct image size (in order of first appearance): every input type of a
    TF-Vision export decodes the batch into one stacked tensor, so a batch must share its
    height and width. image_bytes and tf_example inputs are sized from the image header.
    """
    groups: dict[tuple[int, ...], tuple[list[int], list]] = {}
    for index, data in enumerate(images):
        if input_type == "image_tensor":
            import tensorflow as tf

            item = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
            shape = item.shape
        else:
            with Image.open(io.BytesIO(data)) as image:
                shape = image.size
            item = data if input_type == "image_bytes" else _example(data)
        indices, items = groups.setdefault(shape, ([], []))
        indices.append(index)
        items.append(item)
    if input_type == "image_tensor":
        return [(indices, np.stack(items)) for indices, items in groups.values()]
    return [(indices, np.array(items, dtype=object)) for indices, items in groups.values()]


def _example(data: bytes) -> bytes:
    """A serialized tf.train.Example holding only `image/encoded` (all the decoder needs)."""
    import tensorflow as tf

    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
    return tf.train.Example(features=tf.train.Features(
        feature={"image/encoded": feature})).SerializeToString()


def unbatch(outputs: dict, normalized: bool | None) -> list[Detections]:
    """Per-image detections from a detection signature's batched outputs (local or Serving).

    Answers in the contract (saved_model.py) are used as they are; `normalized` is read only
    for a SavedModel exported before it, recognized by its `image_info` output."""
    counts = np.asarray(outputs["num_detections"]).reshape(-1).astype(int)
    boxes, scores = np.asarray(outputs["detection_boxes"]), np.asarray(outputs["detection_scores"])
    classes = np.asarray(outputs["detection_classes"])
    found = []
    for index, count in enumerate(counts):
        image_boxes = boxes[index][:count].astype(np.float64)
        if "image_info" in outputs and not normalized:
            image_boxes = _normalize(image_boxes, np.asarray(outputs["image_info"])[index])
        found.append(Detections(boxes=np.clip(image_boxes, 0.0, 1.0),
                                scores=scores[index][:count],
                                classes=classes[index][:count].astype(int)))
    return found


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


def _load_checkpoint(model_dir: str | Path, input_type: str = "image_tensor") -> Detector:
    import tensorflow as tf

    from odapi_operators.core.model.export_module import export_module, image_tensor_function

    params = tfvision.load_params(model_dir)
    checkpoint = tfvision.latest_checkpoint(model_dir)
    module = export_module(params, input_type)
    tf.train.Checkpoint(model=module.model).read(checkpoint).expect_partial()
    # One graph for every image size, traced as the export traces it (so an export of this
    # module reuses it): called as a tf.function, each new image shape would trace again.
    function = image_tensor_function(module)

    def run(tensor):
        return function(tensor)

    run.module = module  # keep the module (and its variables) alive: the function holds it weakly
    return Detector("checkpoint", checkpoint, "image_tensor", True, run, module)


def saved_model_info(saved_model: str | Path) -> tuple[str | None, bool | None]:
    """(input type, normalized outputs) from our assets.extra files, when present (a local
    folder or, given as a string, a gs:// one).

    `normalized` only matters for a SavedModel exported before the OD API contract (one that
    still answers `image_info`): its boxes were normalized only if its RetinaNet
    `export_config` said so."""
    from odapi_operators.core.model.saved_model import EXPORT_INFO, PARAMS_FILE, extra_file

    info, params_file = extra_file(saved_model, EXPORT_INFO), extra_file(saved_model, PARAMS_FILE)
    input_type = normalized = None
    if storage.exists(info):
        input_type = json.loads(storage.read_text(info)).get("input_type")
    if storage.exists(params_file):
        params = yaml.safe_load(storage.read_text(params_file)) or {}
        export_config = (params.get("task") or {}).get("export_config") or {}
        normalized = bool(export_config.get("output_normalized_coordinates", False))
    return input_type, normalized


def _load_saved_model(saved_model: Path) -> Detector:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model), tags=["serve"])
    signature = loaded.signatures["serving_default"]
    input_type, normalized = saved_model_info(saved_model)
    if input_type is None:
        spec = signature.structured_input_signature[1]["inputs"]
        input_type = "image_tensor" if spec.dtype == tf.uint8 else "image_bytes"

    def run(tensor):
        return signature(inputs=tensor)

    run.loaded = loaded  # keep the loaded object (and its variables) alive
    return Detector("saved_model", str(saved_model), input_type, normalized, run)


def load_detector(path: str | Path, export_input_type: str = "image_tensor") -> Detector:
    """A detector from a model dir (newest checkpoint) or a SavedModel/export/version dir.

    A checkpoint's export module is built for `export_input_type`, the input type an export
    of it in this process will serve (`Detector.module`); detection always feeds image
    tensors."""
    tfvision.setup_tensorflow()
    saved_model = saved_model_dir(path)
    if saved_model is not None:
        return _load_saved_model(saved_model)
    if (Path(path) / tfvision.TRAIN_INFO).is_file():
        return _load_checkpoint(path, export_input_type)
    raise FileNotFoundError(f"{path}: neither a model dir written by `odapi train` nor a "
                            "SavedModel (no saved_model.pb)")
