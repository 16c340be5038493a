"""TF-Vision's detection export module, made to answer like a TF Object Detection API model.

TF-Vision's `DetectionModule.serve` answers differently per model: RetinaNet normalizes boxes
only when its `export_config` says so (and has no such config for Faster R-CNN, whose boxes
stay pixels of the resized input), classes and counts are int32, and an `image_info` output
rides along. `ODAPIDetectionModule` puts every model config behind the contract of
`saved_model.DETECTION_OUTPUTS`, so Serving clients written for the OD API (and our own
detector, evaluation and pre-annotation) read one shape of answer. It also adds the
`saved_model.BYTES_SIGNATURE` (encoded images as a string batch) next to `serving_default`, the
signature REST clients call with `{"instances": [{"b64": ...}]}`.

Tracing the model is most of an export's time on a small model, so it is traced once: every
input type's function decodes its inputs and calls one shared `tf.function` (`answer`) for the
decoded images, and the model's lazily built head is built before that trace (a first trace
that creates variables is traced twice by `tf.function`).

Importing this module sets TensorFlow up (`tfvision.setup_tensorflow`): import it only where
TensorFlow may live (a stage child process, a test).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from odapi_operators.core.model import tfvision
from odapi_operators.core.model.saved_model import BYTES_SIGNATURE, DETECTION_OUTPUTS, INPUT_NAME

tfvision.setup_tensorflow()

import tensorflow as tf  # noqa: E402  (after setup_tensorflow: tf_keras, registered experiments)
import tf_keras  # noqa: E402
from tensorflow.python.saved_model import save_context  # noqa: E402  (no public equivalent)
from official.vision import configs  # noqa: E402
from official.vision.modeling import retinanet_model  # noqa: E402
from official.vision.serving import detection  # noqa: E402


def normalizes_itself(params) -> bool:
    """Whether TF-Vision's own `serve` already returns boxes normalized to the image."""
    return (isinstance(params.task.model, configs.retinanet.RetinaNet)
            and params.task.export_config.output_normalized_coordinates)


class ODAPIDetectionModule(detection.DetectionModule):
    """`DetectionModule` whose every signature returns exactly `DETECTION_OUTPUTS`:
    boxes [ymin, xmin, ymax, xmax] in [0, 1] of the original image, classes as the label
    map's ids, all float32, and `num_detections` per image."""

    def _build_model(self):
        model = super()._build_model()
        build_head(model)
        return model

    def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.answer(images)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
                 autograph=False)
    def answer(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        """The contract's answer for a batch of decoded images: one trace of the model for
        every signature (each input type's function only decodes, then calls this).

        Without AutoGraph: the model's Python branches on configuration only, never on a
        tensor (one would fail the trace, not change it), and converting every layer's call
        made the trace a third slower; the answers are identical."""
        return self.contract(detection.DetectionModule.serve(self, images))

    def contract(self, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """TF-Vision's answer (`DetectionModule.serve`) in the contract's terms."""
        answer = {key: tf.cast(outputs[key], tf.float32) for key in DETECTION_OUTPUTS}
        if not normalizes_itself(self.params):  # pixels of the resized input -> [0, 1]
            answer = self._normalize_coordinates(answer, ["detection_boxes"],
                                                 outputs["image_info"])
        return answer

    def get_inference_signatures(self, function_keys: dict[str, str]) -> dict:
        """The requested signatures plus `BYTES_SIGNATURE` (encoded images, any input type),
        traced as `tf.saved_model.save` looks them up (`tracing_as_saved`). Called again
        with the same keys, it returns the same concrete functions without tracing."""
        with tracing_as_saved():
            signatures = super().get_inference_signatures(function_keys)
            signatures[BYTES_SIGNATURE] = self.inference_from_image_bytes.get_concrete_function(
                tf.TensorSpec([self._batch_size], tf.string, name=INPUT_NAME))
        return signatures


def save_options() -> tf.saved_model.SaveOptions:
    """`tf.saved_model.save` options for a SavedModel that only serves.

    By default the save traces the gradient of every `tf.custom_gradient` op for a later
    fine-tuning of the SavedModel: one tf.function per op, each swish activation of
    SpineNet-Mobile (375), two thirds of the save's time. Serving computes no gradient, and a
    warm start reads only the SavedModel's variables, as a checkpoint (warm_start.py).
    """
    return tf.saved_model.SaveOptions(experimental_custom_gradients=False)


def image_tensor_function(module: ODAPIDetectionModule):
    """The module's answer for a batch of decoded images of any size, traced exactly as the
    export traces its `image_tensor` signature (same spec, same save context): evaluation and
    export in one process share this one trace of the model."""
    with tracing_as_saved():
        return module.inference_from_image_tensors.get_concrete_function(
            tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME))


@contextlib.contextmanager
def tracing_as_saved() -> Iterator[None]:
    """Trace functions in the context `tf.saved_model.save(..., options=save_options())`
    looks them up in.

    `tf.function` keys its traces by context, and a save's context (its options' variable
    policy) is part of the key: functions traced outside it, as TF-Vision traces the
    signatures before saving, are traced again during the save, the whole model once more.
    """
    if save_context.in_save_context():
        yield
        return
    with save_context.save_context(save_options()):
        yield


def build_head(model) -> None:
    """Create the variables of a RetinaNet head that TF-Vision's factory leaves unbuilt (it
    builds the head through the decoder, and SpineNet-Mobile has none), from the backbone's
    output shapes: built inside the first trace instead, they would make `tf.function` trace
    the whole model twice."""
    if isinstance(model, retinanet_model.RetinaNetModel) and not model.head.built:
        model.head({level: tf_keras.Input(shape[1:])
                    for level, shape in model.backbone.output_specs.items()})


def export_module(params, input_type: str = "image_tensor") -> ODAPIDetectionModule:
    """The module for `params` at its training input size, any batch size."""
    return ODAPIDetectionModule(params=params, batch_size=None,
                                input_image_size=list(params.task.model.input_size[:2]),
                                input_type=input_type, num_channels=3, input_name=INPUT_NAME)
