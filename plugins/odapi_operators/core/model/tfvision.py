"""Building TF-Vision experiment configs from our model YAML, and the TF process setup.

A model config is `experiment: <registered TF-Vision experiment>` plus `params:` overrides,
applied strictly (an unknown key fails, naming it). The pipeline fills the keys it owns from
the data: the number of classes from the label map, TFRecord patterns, steps and batch size.
Only call these functions in a process that may hold TensorFlow (a stage child process).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from odapi_operators.core import storage
from odapi_operators.core.data.tfrecord import RecordFramingError, read_records
from odapi_operators.core.failures import Failure
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.model import cluster

TRAIN_INFO = "odapi_train.json"
PIPELINE_OWNED = (
    "task.model.num_classes",
    "task.train_data.input_path",
    "task.validation_data.input_path",
    "task.train_data.global_batch_size",
    "trainer.train_steps",
)


class ModelConfigError(ValueError):
    """The model config is invalid; the message names the file and key."""
    failure = Failure.CONFIG


def setup_tensorflow() -> None:
    """Environment every TF stage needs, set before TensorFlow is imported."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Model Garden uses tf_keras
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    import official.vision.registry_imports  # noqa: F401  (registers the experiments)


def read_data_summary(data_dir: str | Path) -> dict:
    """The records stage summary of `data_dir` (split patterns, label map, class count); a
    local folder or a gs:// one (joined as a string: a Path would fold its `//`)."""
    path = f"{str(data_dir).rstrip('/')}/{SUMMARY}"
    if not storage.exists(path):
        raise FileNotFoundError(f"{data_dir}: not a records folder (no summary.json)")
    return json.loads(storage.read_text(path))


def val_examples(data_dir: str | Path, count: int | None = None) -> list[bytes]:
    """Serialized tf.train.Examples of the val split (the first `count`, or all), in shard
    order; an empty split is an error naming its files. Read without TensorFlow (the report
    needs no TF at all; TF's reader would cost its ~5 s import)."""
    pattern = read_data_summary(data_dir)["splits"]["val"]["pattern"]
    folder, name = pattern.rsplit("/", 1)
    examples: list[bytes] = []
    for path in storage.list_files(folder):
        head, base = path.rsplit("/", 1)
        if head.rstrip("/") != folder.rstrip("/") or not fnmatch.fnmatchcase(base, name):
            continue
        with storage.open_read(path) as stream:
            try:
                for offset, data in read_records(stream):
                    if data is None:
                        raise ValueError(f"{path}: corrupt TFRecord: data checksum mismatch "
                                         f"at byte {offset}")
                    examples.append(data)
                    if count is not None and len(examples) >= count:
                        return examples
            except RecordFramingError as exc:
                raise ValueError(f"{path}: {exc}") from None
    if not examples:
        raise ValueError(f"{pattern}: the val split has no image")
    return examples


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix]
    keys = []
    for key, value in tree.items():
        keys.extend(_dotted_keys(value, f"{prefix}.{key}" if prefix else str(key)))
    return keys


def load_model_config(path: str | Path) -> tuple[str, dict]:
    """(experiment name, params overrides) from a model YAML, with owned keys refused."""
    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelConfigError(f"{path}: cannot read model config: {exc}") from None
    unknown = set(data) - {"experiment", "params"}
    if unknown or not isinstance(data.get("experiment"), str):
        raise ModelConfigError(f"{path}: needs 'experiment' (a registered TF-Vision experiment) "
                               f"and optional 'params'; unknown keys: {sorted(unknown)}")
    params = data.get("params") or {}
    owned = [k for k in _dotted_keys(params) if any(k.startswith(o) for o in PIPELINE_OWNED)]
    if owned:
        raise ModelConfigError(f"{path}: {', '.join(owned)} is set by the pipeline; remove it")
    return data["experiment"], params


def build_params(model_config: str | Path, data_dir: str | Path, steps: int, batch_size: int):
    """The ExperimentConfig for training on `data_dir` for `steps` steps."""
    from official.core import exp_factory

    experiment, overrides = load_model_config(model_config)
    try:
        params = exp_factory.get_exp_config(experiment)
    except (KeyError, AssertionError):
        raise ModelConfigError(f"{model_config}: experiment: {experiment!r} is not a "
                               "registered TF-Vision experiment") from None
    try:
        params.override(overrides, is_strict=True)
    except (KeyError, ValueError, AttributeError) as exc:
        raise ModelConfigError(f"{model_config}: params: {exc}") from None
    data = read_data_summary(data_dir)
    per_loop = min(params.trainer.steps_per_loop, steps)
    owned = {
        "task": {
            "model": {"num_classes": data["num_classes"] + 1},  # + background
            "train_data": {"input_path": data["splits"]["train"]["pattern"],
                           "global_batch_size": batch_size},
            "validation_data": {"input_path": data["splits"]["val"]["pattern"]},
        },
        "trainer": {"train_steps": steps, "steps_per_loop": per_loop,
                    "summary_interval": per_loop, "validation_steps": -1,
                    "checkpoint_interval": max(per_loop, params.trainer.checkpoint_interval
                                               // per_loop * per_loop)},
    }
    params.override(owned, is_strict=True)
    learning_rate = params.trainer.optimizer_config.learning_rate
    if learning_rate.type == "cosine":
        learning_rate.cosine.decay_steps = steps
    params.validate()
    return params


_PEAK_FIELDS = ("initial_learning_rate", "learning_rate", "values")  # stepwise: values


def _schedule(params):
    schedule = params.trainer.optimizer_config.learning_rate.get()
    name = next((n for n in _PEAK_FIELDS if hasattr(schedule, n)), None)
    return schedule, name


def fine_tune(params, factor: float) -> None:
    """Turn the model config's schedule into a fine-tuning one, for a training that starts
    from a trained detector: the peak learning rate times `factor` and no warm-up (a cosine
    schedule still decays over this run's steps). The warm-up protects freshly initialised
    weights; restarted on trained ones it first drops the rate and then climbs back to the
    full peak, which shakes the model out of what it learned before the short budget of a
    warm start can bring it back."""
    schedule, name = _schedule(params)
    if name is None:
        raise ModelConfigError(f"learning rate schedule "
                               f"{params.trainer.optimizer_config.learning_rate.type!r} has no "
                               "peak to scale for a warm start")
    value = getattr(schedule, name)
    setattr(schedule, name, [v * factor for v in value] if name == "values" else value * factor)
    params.trainer.optimizer_config.warmup.type = None


def learning_rate_record(params, fine_tune_factor: float | None) -> dict:
    """The schedule a training runs, as its start record shows it."""
    schedule, name = _schedule(params)
    peak = getattr(schedule, name) if name else None
    warmup = params.trainer.optimizer_config.warmup.get()
    return {"schedule": params.trainer.optimizer_config.learning_rate.type,
            "peak": max(peak) if isinstance(peak, (list, tuple)) else peak,
            "warmup_steps": getattr(warmup, "warmup_steps", None) or 0,
            "fine_tune_factor": fine_tune_factor}


def save_params(params, experiment: str, model_dir: str | Path, **info: Any) -> None:
    """Persist params so evaluate/export rebuild exactly the trained model."""
    from official.core import train_utils

    Path(model_dir).mkdir(parents=True, exist_ok=True)
    train_utils.serialize_config(params, str(model_dir))
    storage.write_text(Path(model_dir) / TRAIN_INFO,
                       json.dumps({"experiment": experiment, **info}, indent=2))


def load_params(model_dir: str | Path):
    """Rebuild the ExperimentConfig a model was trained with."""
    from official.core import exp_factory
    from official.modeling import hyperparams

    info = json.loads(storage.read_text(Path(model_dir) / TRAIN_INFO))
    params = exp_factory.get_exp_config(info["experiment"])
    return hyperparams.override_params_dict(params, str(Path(model_dir) / "params.yaml"),
                                            is_strict=True)


def checkpoint_step(checkpoint: str) -> int:
    """The training step a checkpoint path names (`.../ckpt-1500` -> 1500)."""
    return int(checkpoint.rsplit("-", 1)[-1])


def newest_checkpoint(model_dir: str | Path) -> str:
    """The newest checkpoint prefix, as `latest_checkpoint` names it, read from the
    `checkpoint` state file (a text CheckpointState) without TensorFlow."""
    state = Path(model_dir) / "checkpoint"
    match = re.search(r'^model_checkpoint_path: "(.*)"$', state.read_text() if state.is_file()
                      else "", re.MULTILINE)
    if match is None:
        raise FileNotFoundError(f"{model_dir}: no checkpoint found")
    name = match.group(1)
    return name if os.path.isabs(name) else str(Path(model_dir) / name)


def latest_checkpoint(model_dir: str | Path) -> str:
    import tensorflow as tf

    checkpoint = tf.train.latest_checkpoint(str(model_dir))
    if checkpoint is None:
        raise FileNotFoundError(f"{model_dir}: no checkpoint found")
    return checkpoint


def distribution_strategy():
    """MultiWorkerMirroredStrategy when TF_CONFIG names several workers (collectives over
    gRPC: TF picks NCCL on GPUs, its ring all-reduce on CPUs); else MirroredStrategy over all
    visible GPUs, or the default strategy on CPU."""
    import tensorflow as tf

    if cluster.role().workers > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if tf.config.list_physical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
