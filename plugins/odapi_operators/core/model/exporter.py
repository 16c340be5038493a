"""Export stage (TensorFlow; child process): checkpoint -> SavedModel, checked before it counts.

TF-Vision's `export_inference_graph` writes into a temporary folder, through our export module
(`export_module.py`): every model config answers in the OD API contract of `saved_model.py`,
with `serving_default` and the `image_bytes` signature. `saved_model/assets.extra/`
gets the label map, the run's config/metrics/decision files, and `tf_serving_warmup_requests`
(PredictionLogs built with tensorflow-serving-api from real validation images, which Serving
replays on load). The SavedModel is then loaded with the `serve` tag, every warmup request is
replayed through `serving_default`, and its detections must match the checkpoint's (the same
export module, weights restored in memory); every signature must answer exactly the contract's
outputs, and `image_bytes` the same detections for the first image's encoded bytes. Only then
is the folder renamed into place.

The evaluate stage can export a candidate ahead of the gate, in its own process (one
TensorFlow start-up and one trace of the model for both); the export stage then only copies
that checked export and adds the run's metrics and decision (`ahead`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from odapi_operators.core import storage
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.model import tfvision
from odapi_operators.core.model.saved_model import (
    ASSETS_EXTRA,
    BYTES_SIGNATURE,
    DETECTION_OUTPUTS,
    EXPORT_INFO,
    INPUT_NAME,
    INPUT_TYPES,
    LABEL_MAP_FILE,
    PARAMS_FILE,
    SERVING_SIGNATURE,
    WARMUP_FILE,
    read_warmup,
    request_input,
    write_warmup,
)

MATCH_TOLERANCE = 1e-3


def _top(outputs: dict) -> dict[str, np.ndarray]:
    count = int(np.asarray(outputs["num_detections"]).reshape(-1)[0])
    return {key: np.asarray(outputs[key])[0][:count]
            for key in ("detection_boxes", "detection_scores", "detection_classes")}


@contextlib.contextmanager
def _serving_signatures_only() -> Iterator[None]:
    """Save the serving signature without tracing every Keras layer's call functions.

    `tf.saved_model.save` of the export module also serializes the Keras model the way
    `model.save` would, tracing each layer's call for Keras to reload it: most of an export's
    time, for functions Serving never calls. The SavedModel keeps its signatures and weights
    (the export check below replays them against the checkpoint); reloading it as a Keras
    model is what it gives up, which nothing here does.
    """
    from tf_keras.src.saving.legacy.saved_model.utils import keras_option_scope

    with keras_option_scope(save_traces=False, in_tf_saved_model_scope=True):
        yield


@contextlib.contextmanager
def _graph_optimization_off() -> Iterator[None]:
    """Run functions first called in this block without Grappler's graph optimizations.

    Grappler optimizes each function when it is first called (over a second each for this
    small model), which pays off over many calls; the check calls each signature a few
    times. The answers compared are the same (within float rounding, far below the check's
    tolerance); Serving optimizes the graph it loads as it always does."""
    import tensorflow as tf

    before = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({**before, "disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options(
            {**before, "disable_meta_optimizer": before.get("disable_meta_optimizer", False)})


def _difference(served: dict, expected: dict, what: str) -> float:
    """Largest difference between two answers' detections; ValueError if their counts differ."""
    served, expected = _top(served), _top(expected)
    if served["detection_scores"].shape != expected["detection_scores"].shape:
        raise ValueError(f"{what} returns {len(served['detection_scores'])} detections, the "
                         f"checkpoint {len(expected['detection_scores'])}")
    return max([float(np.abs(served[key] - expected[key]).max())
                for key in served if served[key].size], default=0.0)


def _check_contract(saved_model_dir: Path, loaded) -> None:
    """Every signature answers exactly DETECTION_OUTPUTS, all float32 (saved_model.py)."""
    import tensorflow as tf

    for name in (SERVING_SIGNATURE, BYTES_SIGNATURE):
        if name not in loaded.signatures:
            raise ValueError(f"{saved_model_dir}: no {name!r} signature "
                             f"(has {sorted(loaded.signatures)})")
        outputs = loaded.signatures[name].structured_outputs
        wrong = {key: spec.dtype.name for key, spec in outputs.items()
                 if key not in DETECTION_OUTPUTS or spec.dtype != tf.float32}
        if wrong or len(outputs) != len(DETECTION_OUTPUTS):
            raise ValueError(f"{saved_model_dir}: signature {name!r} answers "
                             f"{ {k: s.dtype.name for k, s in outputs.items()} }, expected "
                             f"float32 {', '.join(DETECTION_OUTPUTS)}")


def check_export(saved_model_dir: Path, module, input_type: str, first_image: bytes) -> dict:
    """Replay the warmup requests through the loaded SavedModel and the in-memory module;
    `first_image` (the first warmup request's encoded image) through `image_bytes`."""
    with _graph_optimization_off():
        return _replay(saved_model_dir, module, input_type, first_image)


def _replay(saved_model_dir: Path, module, input_type: str, first_image: bytes) -> dict:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model_dir), tags=["serve"])
    _check_contract(saved_model_dir, loaded)
    signature = loaded.signatures[SERVING_SIGNATURE]
    # The concrete function that was saved, with the checkpoint's weights in memory: called
    # through the module's tf.function instead, it would be traced again (another context).
    reference = module.get_inference_signatures({input_type: SERVING_SIGNATURE})[
        SERVING_SIGNATURE]
    worst, detections = 0.0, 0
    arrays = read_warmup(saved_model_dir / ASSETS_EXTRA / WARMUP_FILE)
    for array in arrays:
        tensor = tf.constant(array, dtype=tf.string if array.dtype == object else tf.uint8)
        served, expected = signature(**{INPUT_NAME: tensor}), reference(tensor)
        worst = max(worst, _difference(served, expected, f"{saved_model_dir}: SavedModel"))
        detections += int(_top(served)["detection_scores"].size)
    as_bytes = loaded.signatures[BYTES_SIGNATURE](**{INPUT_NAME: tf.constant([first_image])})
    worst = max(worst, _difference(as_bytes, reference(tf.constant(arrays[0])),
                                   f"{saved_model_dir}: signature {BYTES_SIGNATURE!r}"))
    if worst > MATCH_TOLERANCE:
        raise ValueError(f"{saved_model_dir}: SavedModel detections differ from the checkpoint's "
                         f"by {worst:.2e} (> {MATCH_TOLERANCE})")
    return {"warmup_requests": len(arrays), "detections": detections, "max_difference": worst,
            "signatures": [SERVING_SIGNATURE, BYTES_SIGNATURE]}


def export(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
           input_type: str = "image_tensor", model_name: str = "model",
           extras: list[str] | None = None, *, warmup_images: int, module=None,
           ahead: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Export the newest checkpoint of `model_dir`; return the checked SavedModel's summary.

    `extras` are files (config, metrics, decision) copied into `assets.extra/`. `module` is
    the checkpoint's export module already restored in this process (an evaluation's), whose
    trace the export reuses. `ahead` is an export made earlier (evaluation's export ahead):
    when it is of the same checkpoint with the same settings it is copied, extras added,
    without TensorFlow; otherwise (`log` says why) the export runs here.
    """
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input_type {input_type!r} not one of {INPUT_TYPES}")
    settings = {"checkpoint": tfvision.newest_checkpoint(model_dir), "input_type": input_type,
                "model_name": model_name, "warmup_images": warmup_images,
                "data": str(data_dir)}
    if ahead is not None:
        summary = _from_ahead(Path(ahead), settings, out_dir, extras or [], log)
        if summary is not None:
            return summary
    from official.vision.serving import export_saved_model_lib

    from odapi_operators.core.model.export_module import export_module, save_options
    from odapi_operators.core.model.saved_model import encoded_image

    if module is None:
        module = export_module(tfvision.load_params(model_dir), input_type)
    elif module._input_type != input_type:
        raise ValueError(f"the module given serves {module._input_type}, not {input_type}")
    params = module.params
    size = list(params.task.model.input_size[:2])
    examples = tfvision.val_examples(data_dir, warmup_images)
    label_map = tfvision.read_data_summary(data_dir)["label_map"]
    with storage.atomic_directory(out_dir) as tmp:
        with _serving_signatures_only():
            export_saved_model_lib.export_inference_graph(
                input_type=input_type, batch_size=None, input_image_size=size, params=params,
                checkpoint_path=settings["checkpoint"], export_dir=str(tmp), export_module=module,
                save_options=save_options(),
                export_checkpoint_subdir="checkpoint", export_saved_model_subdir="saved_model")
        extra = tmp / "saved_model" / ASSETS_EXTRA
        extra.mkdir(parents=True, exist_ok=True)
        shutil.copy(label_map, extra / LABEL_MAP_FILE)
        shutil.copy(Path(model_dir) / PARAMS_FILE, extra / PARAMS_FILE)
        _copy_extras(extras or [], extra)
        storage.write_text(extra / EXPORT_INFO, json.dumps({"input_type": input_type,
                                                            "model_name": model_name}))
        write_warmup(extra / WARMUP_FILE, model_name,
                     [request_input(e, input_type) for e in examples])
        check = check_export(tmp / "saved_model", module, input_type,
                             encoded_image(examples[0]))
        summary = {**settings, "saved_model": str(Path(out_dir) / "saved_model"), "check": check}
        storage.write_text(tmp / SUMMARY, json.dumps(summary, indent=2))
    return summary


def _copy_extras(extras: list[str], extra: Path) -> None:
    for path in extras:
        shutil.copy(path, extra / Path(path).name)


def _from_ahead(ahead: Path, settings: dict, out_dir: str | Path, extras: list[str],
                log: Callable[[str], None]) -> dict | None:
    """`out_dir` as a copy of the checked export `ahead` plus `extras`, if `ahead` was made
    with `settings` (the same checkpoint, input type, model name, warmup images and
    records); else None. The copy replaces `out_dir` whole, as an export does."""
    summary_file = ahead / SUMMARY
    if not summary_file.is_file():
        log(f"export ahead {ahead}: not there (no {SUMMARY}); exporting here")
        return None
    made = json.loads(summary_file.read_text())
    differences = [f"{key} {made.get(key)!r}, not {wanted!r}"
                   for key, wanted in settings.items() if made.get(key) != wanted]
    if differences:
        log(f"export ahead {ahead} differs ({', '.join(differences)}); exporting here")
        return None
    with storage.atomic_directory(out_dir) as tmp:
        shutil.copytree(ahead, tmp, dirs_exist_ok=True)
        _copy_extras(extras, tmp / "saved_model" / ASSETS_EXTRA)
        summary = {**made, "saved_model": str(Path(out_dir) / "saved_model"),
                   "ahead": str(ahead)}
        storage.write_text(tmp / SUMMARY, json.dumps(summary, indent=2))
    log(f"export ahead {ahead}: same checkpoint and settings, copied with the run's "
        f"{len(extras)} extra file(s)")
    return summary
