"""The SavedModel contract: what an exported model carries and how clients talk to it.

    saved_model/saved_model.pb, variables/
    saved_model/assets.extra/label_map.pbtxt            class ids of the detections
    saved_model/assets.extra/params.yaml                the TF-Vision experiment it was built from
    saved_model/assets.extra/odapi_export.json          input type and model name
    saved_model/assets.extra/tf_serving_warmup_requests PredictionLogs Serving replays on load

Every model config answers the same way, as TF Object Detection API exports do (so OD API
client code reads it unchanged), in `serving_default` and in `image_bytes`:

    detection_boxes   float32 [batch, N, 4]  [ymin, xmin, ymax, xmax] in [0, 1] of the image
    detection_classes float32 [batch, N]     label_map.pbtxt ids (1-based)
    detection_scores  float32 [batch, N]     best first
    num_detections    float32 [batch]        how many of the N rows are detections

`serving_default` takes what the export's input type says (`inputs`: uint8 images, encoded
images or serialized tf.Examples); `image_bytes` always takes encoded images (`inputs`: a
string batch), what REST clients send as `{"instances": [{"b64": "<JPEG>"}]}`.

The exporter writes these; the detector, the predictors, the Serving client and the serving
directory read them. Every name is spelled here only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ASSETS_EXTRA = "assets.extra"
LABEL_MAP_FILE = "label_map.pbtxt"
PARAMS_FILE = "params.yaml"


def extra_file(saved_model: str | Path, name: str) -> str:
    """`<saved_model>/assets.extra/<name>`, for local paths and gs:// alike."""
    return f"{str(saved_model).rstrip('/')}/{ASSETS_EXTRA}/{name}"


# What `serving_default` may take (TF-Vision's export input types).
INPUT_TYPES = ("image_tensor", "image_bytes", "tf_example")


WARMUP_FILE = "tf_serving_warmup_requests"


EXPORT_INFO = "odapi_export.json"  # assets.extra/: the input type, read back by core/detector


INPUT_NAME = "inputs"

SERVING_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "image_bytes"
DETECTION_OUTPUTS = ("detection_boxes", "detection_classes", "detection_scores",
                     "num_detections")


def encoded_image(example: bytes) -> bytes:
    """The encoded image (`image/encoded`) of a serialized tf.train.Example."""
    import tensorflow as tf

    return tf.train.Example.FromString(example).features.feature[
        "image/encoded"].bytes_list.value[0]


def request_input(example: bytes, input_type: str) -> np.ndarray:
    """The `inputs` tensor a client sends for one image, per input type (batch of one)."""
    import tensorflow as tf

    if input_type == "tf_example":
        return np.array([example], dtype=object)
    encoded = encoded_image(example)
    if input_type == "image_bytes":
        return np.array([encoded], dtype=object)
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()
    return image[np.newaxis]


def write_warmup(path: Path, model_name: str, inputs: list[np.ndarray]) -> int:
    """Write PredictionLog warmup records (at most 1000, Serving's limit); return the count."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(str(path)) as writer:
        for array in inputs[:1000]:
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(
                name=model_name, signature_name=SERVING_SIGNATURE))
            request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(array))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return min(len(inputs), 1000)


def read_warmup(path: str | Path) -> list[np.ndarray]:
    """The `inputs` arrays of a warmup file, parsed back through the Serving protos."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    arrays = []
    for raw in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        arrays.append(tf.make_ndarray(log.predict_log.request.inputs[INPUT_NAME]))
    return arrays
