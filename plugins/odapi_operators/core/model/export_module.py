"""TF-Vision's detection export module, made to answer like a TF Object Detection API model.

TF-Vision's `DetectionModule.serve` answers differently per model: RetinaNet normalizes boxes
only when its `export_config` says so (and has no such config for Faster R-CNN, whose boxes
stay pixels of the resized input), classes and counts are int32, and an `image_info` output
rides along. `ODAPIDetectionModule` puts every model config behind the contract of
`saved_model.DETECTION_OUTPUTS`, so Serving clients written for the OD API (and our own
detector, evaluation and pre-annotation) read one shape of answer. It also adds the
`saved_model.BYTES_SIGNATURE` (encoded images as a string batch) next to `serving_default`, the
signature REST clients call with `{"instances": [{"b64": ...}]}`.

Importing this module sets TensorFlow up (`tfvision.setup_tensorflow`): import it only where
TensorFlow may live (a stage child process, a test).
"""

from __future__ import annotations

from odapi_operators.core.model import tfvision
from odapi_operators.core.model.saved_model import BYTES_SIGNATURE, DETECTION_OUTPUTS, INPUT_NAME

tfvision.setup_tensorflow()

import tensorflow as tf  # noqa: E402  (after setup_tensorflow: tf_keras, registered experiments)
from official.vision import configs  # noqa: E402
from official.vision.serving import detection  # noqa: E402


def normalizes_itself(params) -> bool:
    """Whether TF-Vision's own `serve` already returns boxes normalized to the image."""
    return (isinstance(params.task.model, configs.retinanet.RetinaNet)
            and params.task.export_config.output_normalized_coordinates)


class ODAPIDetectionModule(detection.DetectionModule):
    """`DetectionModule` whose every signature returns exactly `DETECTION_OUTPUTS`:
    boxes [ymin, xmin, ymax, xmax] in [0, 1] of the original image, classes as the label
    map's ids, all float32, and `num_detections` per image."""

    def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.contract(super().serve(images))

    def contract(self, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """TF-Vision's answer (`DetectionModule.serve`) in the contract's terms."""
        answer = {key: tf.cast(outputs[key], tf.float32) for key in DETECTION_OUTPUTS}
        if not normalizes_itself(self.params):  # pixels of the resized input -> [0, 1]
            answer = self._normalize_coordinates(answer, ["detection_boxes"],
                                                 outputs["image_info"])
        return answer

    def get_inference_signatures(self, function_keys: dict[str, str]) -> dict:
        """The requested signatures plus `BYTES_SIGNATURE` (encoded images, any input type)."""
        signatures = super().get_inference_signatures(function_keys)
        signatures[BYTES_SIGNATURE] = self.inference_from_image_bytes.get_concrete_function(
            tf.TensorSpec([self._batch_size], tf.string, name=INPUT_NAME))
        return signatures


def export_module(params, input_type: str = "image_tensor") -> ODAPIDetectionModule:
    """The module for `params` at its training input size, any batch size."""
    return ODAPIDetectionModule(params=params, batch_size=None,
                                input_image_size=list(params.task.model.input_size[:2]),
                                input_type=input_type, num_channels=3)
