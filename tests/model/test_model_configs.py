"""The model configs in include/configs/models: each builds a detector for real records.

In-process TensorFlow on CPU: one float32 forward pass per config (R50 models at 256 px, as
640 px costs 4-13 s per pass), and mixed precision checked by tracing, not running, the
inference graph (float16 maths on CPU is ~30x slower than float32). The ResNet-50 configs take
20-90 s per test on a shared 2-core machine: marked slow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from odapi_operators.core.model.tfvision import PIPELINE_OWNED

from conftest import ROOT, prepare_records

CONFIG_DIR = ROOT / "include" / "configs" / "models"
TEST_INPUT_SIZE = 256  # divisible by 2**max_level for every config (max_level <= 7)
DETECTION_KEYS = {"detection_boxes", "detection_scores", "detection_classes", "num_detections"}
BATCH = 1


def precision(config: Path) -> str:
    return yaml.safe_load(config.read_text())["params"]["runtime"]["mixed_precision_dtype"]


def heavy_if_gpu(config: Path) -> Any:
    """A parameter per config; the float16 (GPU, ResNet-50) ones are slow on CPU."""
    return pytest.param(config, id=config.stem,
                        marks=[pytest.mark.slow] if precision(config) == "float16" else [])


MODEL_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
CONFIG_PARAMS = [heavy_if_gpu(c) for c in MODEL_CONFIGS]
MIXED_PRECISION_PARAMS = [heavy_if_gpu(c) for c in MODEL_CONFIGS if precision(c) == "float16"]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return prepare_records(tmp_path_factory.mktemp("model-configs"))


@pytest.fixture(scope="module")
def tfvision():
    from odapi_operators.core.model import tfvision

    tfvision.setup_tensorflow()
    return tfvision


@pytest.fixture
def keras_state():
    """Models and apply_runtime's policy are process-wide: free them and reset to float32."""
    import tf_keras

    try:
        yield
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
        tf_keras.backend.clear_session()


def small_task(tfvision: Any, config: Path, records: Path) -> tuple[Any, Any]:
    """(params, task) for `config` on `records`, at most TEST_INPUT_SIZE px, batch BATCH."""
    from official.core import task_factory

    params = tfvision.build_params(config, records, steps=10, batch_size=BATCH)
    size = min(params.task.model.input_size[0], TEST_INPUT_SIZE)
    params.override({"task": {"model": {"input_size": [size, size, 3]},
                              "validation_data": {"global_batch_size": BATCH}}})
    return params, task_factory.get_task(params.task)


def detect(task: Any, params: Any, model: Any, *, trace_only: bool = False) -> dict:
    """Inference (training=False, as evaluate and export run it) on one validation batch."""
    import tensorflow as tf

    images, labels = next(iter(task.build_inputs(params.task.validation_data)))
    inputs = (images, labels["image_info"][:, 1, :], labels["anchor_boxes"])

    def call(images, image_shape, anchor_boxes):
        return model(images, image_shape=image_shape, anchor_boxes=anchor_boxes, training=False)

    if trace_only:
        return tf.function(call).get_concrete_function(*inputs).structured_outputs
    return call(*inputs)


def with_param(config: Path, dotted: str, value: Any, folder: Path) -> Path:
    """A copy of model config `config` with `params.<dotted>` set to `value`."""
    data = yaml.safe_load(config.read_text())
    *parents, leaf = dotted.split(".")
    node = data["params"]
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    copy = folder / config.name
    copy.write_text(yaml.safe_dump(data))
    return copy


def test_cpu_and_gpu_configs_are_all_found():
    assert {c.stem for c in MODEL_CONFIGS} >= {
        "retinanet_mobile_sample", "retinanet_resnet50_fpn", "faster_rcnn_resnet50_fpn"}


@pytest.mark.parametrize("config", CONFIG_PARAMS)
def test_config_builds_a_detector_for_the_records(config, records, tfvision, keras_state):
    params, task = small_task(tfvision, config, records)
    assert params.task.model.num_classes == tfvision.read_data_summary(records)["num_classes"] + 1
    assert not params.task.init_checkpoint, "nothing may be downloaded at run time"
    assert not params.task.annotation_file, "ground truth comes from the TFRecords"

    outputs = detect(task, params, task.build_model())

    assert DETECTION_KEYS <= set(outputs)
    most = params.task.model.detection_generator.max_num_detections
    assert outputs["detection_boxes"].shape == (BATCH, most, 4)
    assert outputs["detection_scores"].shape == (BATCH, most)
    assert outputs["detection_classes"].shape == (BATCH, most)
    classes, found = outputs["detection_classes"].numpy(), outputs["num_detections"].numpy()
    for row, count in zip(classes, found):
        assert all(1 <= c < params.task.model.num_classes for c in row[:count])


@pytest.mark.slow
@pytest.mark.parametrize("config", [CONFIG_DIR / "retinanet_mobile_sample.yaml",
                                    CONFIG_DIR / "faster_rcnn_resnet50_fpn.yaml"],
                         ids=lambda c: c.stem)
def test_every_model_family_exports_the_od_api_contract(config, records, tfvision,
                                                        keras_state):
    """RetinaNet and Faster R-CNN through the export module, untrained, in one traced graph:
    the answer is exactly the contract's float32 outputs, and a real image's boxes are
    TF-Vision's own answer normalized to the image by hand (TF-Vision leaves R-CNN boxes,
    and RetinaNet's without its export_config, in pixels of the resized input). Every
    detection is kept (score threshold 0), so there are some. 128 px: tracing dominates."""
    import numpy as np
    import tensorflow as tf
    from official.vision.serving.detection import DetectionModule

    from odapi_operators.core.model.export_module import export_module
    from odapi_operators.core.model.saved_model import DETECTION_OUTPUTS, encoded_image

    params = tfvision.build_params(config, records, steps=10, batch_size=BATCH)
    params.override({"task": {"model": {"input_size": [128, 128, 3], "detection_generator": {
        "pre_nms_score_threshold": 0.0}}}})
    module = export_module(params)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
                 autograph=False)  # as the export module's `answer` traces the model
    def both(images):
        own = DetectionModule.serve(module, images)
        return own, module.contract(dict(own))

    own, answer = both.get_concrete_function().structured_outputs
    assert {key: spec.dtype for key, spec in answer.items()} == \
        {key: tf.float32 for key in DETECTION_OUTPUTS}
    assert own["detection_classes"].dtype == tf.int32 and "image_info" in own

    image = tf.io.decode_image(encoded_image(tfvision.val_examples(records, 1)[0]), channels=3)
    own, answer = both(image[tf.newaxis])
    count = int(answer["num_detections"][0])
    assert count > 0 and count == int(own["num_detections"][0])
    info = own["image_info"].numpy()[0]  # original size, resized size, scale, offset
    expected = np.clip(own["detection_boxes"].numpy()[0, :count] / np.tile(info[2], 2)
                       / np.tile(info[0], 2), 0.0, 1.0)
    assert np.allclose(answer["detection_boxes"].numpy()[0, :count], expected, atol=1e-5)
    assert np.array_equal(answer["detection_classes"].numpy()[0, :count],
                          own["detection_classes"].numpy()[0, :count].astype(np.float32))


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda c: c.stem)
def test_saved_params_rebuild_the_same_config(config, records, tfvision, tmp_path):
    """What evaluate and export read back (params.yaml, strictly) is what train used."""
    experiment, _ = tfvision.load_model_config(config)
    params = tfvision.build_params(config, records, steps=10, batch_size=2)
    tfvision.save_params(params, experiment, tmp_path)
    assert tfvision.load_params(tmp_path).as_dict() == params.as_dict()


@pytest.mark.parametrize("config", MIXED_PRECISION_PARAMS)
def test_mixed_precision_reaches_model_and_optimizer(config, records, tfvision,
                                                     keras_state):
    import tensorflow as tf
    import tf_keras

    from odapi_operators.core.model.runtime import apply_runtime

    params, task = small_task(tfvision, config, records)
    apply_runtime(params)
    model = task.build_model()

    assert {layer.compute_dtype for layer in model.backbone.layers if layer.weights} == {"float16"}
    assert {v.dtype for v in model.backbone.trainable_variables} == {tf.float32}
    optimizer = task.create_optimizer(params.trainer.optimizer_config, params.runtime)
    assert isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer) and optimizer.dynamic
    outputs = detect(task, params, model, trace_only=True)  # the NMS accepts float16 scores
    assert DETECTION_KEYS <= set(outputs)


def test_float32_runtime_leaves_the_policy_alone(records, tfvision, keras_state):
    import tf_keras

    from odapi_operators.core.model.runtime import apply_runtime

    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    apply_runtime(tfvision.build_params(CONFIG_DIR / "retinanet_mobile_sample.yaml", records,
                                        steps=10, batch_size=2))
    assert tf_keras.mixed_precision.global_policy().name == "mixed_bfloat16"


def test_unknown_mixed_precision_name_is_refused(records, tfvision):
    from odapi_operators.core.model.runtime import apply_runtime

    params = tfvision.build_params(CONFIG_DIR / "retinanet_mobile_sample.yaml", records,
                                  steps=10, batch_size=2)
    params.override({"runtime": {"mixed_precision_dtype": "mixed_float16"}})
    with pytest.raises(tfvision.ModelConfigError, match="runtime.mixed_precision_dtype"):
        apply_runtime(params)


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda c: c.stem)
def test_unknown_key_fails_naming_it(config, records, tfvision, tmp_path):
    typo = with_param(config, "task.model.detection_generator.nms_verison", "v2", tmp_path)
    with pytest.raises(tfvision.ModelConfigError, match="nms_verison"):
        tfvision.build_params(typo, records, steps=10, batch_size=2)


@pytest.mark.parametrize("owned", PIPELINE_OWNED)
def test_pipeline_owned_key_is_refused(owned, records, tfvision, tmp_path):
    config = with_param(CONFIG_DIR / "retinanet_resnet50_fpn.yaml", owned, 5, tmp_path)
    with pytest.raises(tfvision.ModelConfigError, match=f"{owned} is set by the pipeline"):
        tfvision.build_params(config, records, steps=10, batch_size=2)
