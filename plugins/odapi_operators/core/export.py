"""Export stage (TensorFlow; child process): checkpoint -> SavedModel, checked before it counts.

TF-Vision's `export_inference_graph` writes into a temporary folder; the SavedModel is loaded
back with the `serve` tag and run on a validation image before the folder is renamed into
place, so a broken export never reaches the push stage. The label map rides along in
`saved_model/assets.extra/`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from odapi_operators.core import storage, tfvision

INPUT_TYPES = ("image_tensor", "image_bytes", "tf_example")


def first_val_image(data_dir: str | Path) -> bytes:
    """Encoded bytes of the first image in the val split's TFRecords."""
    import tensorflow as tf

    pattern = tfvision.read_data_summary(data_dir)["splits"]["val"]["pattern"]
    dataset = tf.data.TFRecordDataset(tf.io.gfile.glob(pattern))
    for raw in dataset.take(1):
        example = tf.train.Example.FromString(raw.numpy())
        return example.features.feature["image/encoded"].bytes_list.value[0]
    raise ValueError(f"{pattern}: no validation image to check the export with")


def smoke_test(saved_model_dir: str | Path, encoded_image: bytes) -> dict:
    """Load with the serve tag and run `serving_default` (image_tensor) on one image."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model_dir), tags=["serve"])
    signature = loaded.signatures["serving_default"]
    image = tf.io.decode_image(encoded_image, channels=3, expand_animations=False)
    outputs = signature(inputs=tf.expand_dims(image, 0))
    boxes = outputs["detection_boxes"].numpy()
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"{saved_model_dir}: detection_boxes has shape {boxes.shape}")
    return {"num_detections": int(outputs["num_detections"].numpy()[0]),
            "top_score": float(outputs["detection_scores"].numpy()[0].max(initial=0.0))}


def export(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
           input_type: str = "image_tensor") -> dict:
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input_type {input_type!r} not one of {INPUT_TYPES}")
    tfvision.setup_tensorflow()
    from official.vision.serving import export_saved_model_lib

    params = tfvision.load_params(model_dir)
    checkpoint = tfvision.latest_checkpoint(model_dir)
    label_map = tfvision.read_data_summary(data_dir)["label_map"]
    with storage.atomic_directory(out_dir) as tmp:
        export_saved_model_lib.export_inference_graph(
            input_type=input_type, batch_size=None,
            input_image_size=list(params.task.model.input_size[:2]), params=params,
            checkpoint_path=checkpoint, export_dir=str(tmp),
            export_checkpoint_subdir="checkpoint", export_saved_model_subdir="saved_model")
        extra = tmp / "saved_model" / "assets.extra"
        extra.mkdir(parents=True, exist_ok=True)
        shutil.copy(label_map, extra / "label_map.pbtxt")
        check = (smoke_test(tmp / "saved_model", first_val_image(data_dir))
                 if input_type == "image_tensor" else {})
        summary = {"saved_model": str(Path(out_dir) / "saved_model"), "checkpoint": checkpoint,
                   "input_type": input_type, "check": check}
        storage.write_text(tmp / "summary.json", json.dumps(summary, indent=2))
    return summary
