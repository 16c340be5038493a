"""Export: every input type, warmup requests from real images, checked against the checkpoint."""

from __future__ import annotations

import json

import pytest

from conftest import odapi

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(exported_model):
    """The session's SavedModel loaded once for this module (a load takes 12-16 s)."""
    import tensorflow as tf

    return tf.saved_model.load(str(exported_model), tags=["serve"])


def test_export_ships_assets_and_replayable_warmup(exported_model, loaded):
    """The session's export (image_bytes; image_tensor is exported end to end in e2e)."""
    input_type, saved_model = "image_bytes", exported_model
    summary = json.loads((exported_model.parent / "summary.json").read_text())
    extra = saved_model / "assets.extra"
    assert {p.name for p in extra.iterdir()} >= {
        "label_map.pbtxt", "params.yaml", "decision.json", "tf_serving_warmup_requests"}
    assert summary["check"]["warmup_requests"] >= 1
    assert summary["check"]["max_difference"] <= 1e-3
    assert not [p for p in saved_model.parent.parent.iterdir() if p.name.startswith(".tmp")]

    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(str(extra / "tf_serving_warmup_requests"))]
    assert len(logs) == summary["check"]["warmup_requests"]
    request = logs[0].predict_log.request
    assert request.model_spec.name == "shapes"
    assert request.model_spec.signature_name == "serving_default"
    expected_dtype = tf.uint8 if input_type == "image_tensor" else tf.string
    assert tf.dtypes.as_dtype(request.inputs["inputs"].dtype) == expected_dtype

    replay = loaded.signatures["serving_default"](
        inputs=tf.constant(tf.make_ndarray(request.inputs["inputs"])))
    assert replay["detection_boxes"].shape[0] == 1 and replay["detection_boxes"].shape[-1] == 4


def test_export_answers_the_od_api_contract_in_both_signatures(exported_model, loaded):
    """What OD API clients read: the four outputs, float32, boxes in [0, 1], classes the label
    map's ids; `image_bytes` next to `serving_default`, both checked at export."""
    import numpy as np
    import tensorflow as tf

    from odapi_operators.core.data.label_map import read_label_map
    from odapi_operators.core.model.saved_model import DETECTION_OUTPUTS, read_warmup

    summary = json.loads((exported_model.parent / "summary.json").read_text())
    assert summary["check"]["signatures"] == ["serving_default", "image_bytes"]
    assert {"serving_default", "image_bytes"} <= set(loaded.signatures)
    for name in ("serving_default", "image_bytes"):
        signature = loaded.signatures[name]
        assert {k: s.dtype for k, s in signature.structured_outputs.items()} == \
            {key: tf.float32 for key in DETECTION_OUTPUTS}
        [spec] = signature.structured_input_signature[1].values()
        assert spec.name == "inputs" and spec.dtype == tf.string and spec.shape.as_list() == [None]

    images = [a[0] for a in read_warmup(exported_model / "assets.extra" /
                                        "tf_serving_warmup_requests")]
    label_ids = set(read_label_map(exported_model / "assets.extra" / "label_map.pbtxt").values())
    answer = {k: v.numpy() for k, v in loaded.signatures["image_bytes"](
        inputs=tf.constant(images[:1])).items()}
    count = int(answer["num_detections"][0])
    assert count > 0  # the session model keeps every detection
    boxes = answer["detection_boxes"][0, :count]
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
    assert set(answer["detection_classes"][0, :count].tolist()) <= label_ids


def test_export_refuses_unknown_input_type(trained_model, tmp_path):
    done = odapi("export", "--model-dir", str(trained_model["model_dir"]), "--data",
                 str(trained_model["records"]), "--out", str(tmp_path / "x"),
                 "--input-type", "jpeg", check=False)
    assert done.returncode == 2 and "invalid choice: 'jpeg'" in done.stderr


def test_tf_example_requests_carry_the_serialized_example(trained_model, tmp_path):
    """The tf_example input type without a third export: its warmup requests hold the
    records' serialized examples, and read back through the Serving protos unchanged."""
    from odapi_operators.core.model.saved_model import read_warmup, request_input, write_warmup
    from odapi_operators.core.model.tfvision import val_examples

    examples = val_examples(trained_model["records"], 2)
    inputs = [request_input(example, "tf_example") for example in examples]
    assert write_warmup(tmp_path / "warmup", "shapes", inputs) == len(examples)
    replayed = read_warmup(tmp_path / "warmup")
    assert [array[0] for array in replayed] == examples
