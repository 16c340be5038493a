"""Where training starts: from scratch, a given checkpoint, or the model in production.

A start point is restored only when the model dir has no checkpoint yet (TF-Vision calls
`task.initialize` only then), so a retried training run still resumes from its own newest
checkpoint. Three kinds of source are understood:

- our own checkpoints (a train model dir or an export's `checkpoint/`, which TF-Vision's
  trainer writes as `backbone/...`, `head/...`; or a SavedModel's `variables/`, written as
  `model/...`), known by the `params.yaml` beside them: the whole model is restored. When
  the classes changed since (an export added one), a RetinaNet keeps all of it too, each
  class's logits moved to its id in the new label map by name (class_transfer.py); other
  heads keep backbone and decoder only (the head's shape differs);
- anything else (e.g. a TF-Vision backbone or zoo checkpoint): TF-Vision's own
  `task.initialize` with `init_checkpoint_modules` from the model config.
"""

from __future__ import annotations

import os
import sys

from odapi_operators.core import storage
from odapi_operators.core.data.label_map import read_label_map
from odapi_operators.core.failures import Failure
from odapi_operators.core.model import class_transfer
from odapi_operators.core.model.saved_model import ASSETS_EXTRA, LABEL_MAP_FILE
from odapi_operators.core.serving import serving_dir
from odapi_operators.core.wording import setting


class StartPointError(ValueError):
    """The requested start point does not exist or cannot be read."""
    failure = Failure.CONFIG


def _log(message: str) -> None:
    print(f"start point: {message}", file=sys.stderr, flush=True)


def production_checkpoint(serving_model_dir: str) -> tuple[str, int] | None:
    """(variables prefix, version) of the version Serving answers with, None if none yet.

    `serving_model_dir` is `<serving base>/<model name>` (or one version folder).
    """
    path = serving_model_dir.rstrip("/")
    if storage.exists(f"{path}/saved_model.pb"):
        return f"{path}/variables/variables", int(os.path.basename(path))
    base, name = os.path.split(path)
    version = serving_dir.production_version(base, name)
    if version is None:
        return None
    return f"{path}/{version}/variables/variables", version


def checkpoint_prefix(path: str) -> str:
    """A checkpoint prefix from a prefix, a checkpoint folder, or a SavedModel/export folder."""
    import tensorflow as tf

    for saved_model in (path, f"{path}/saved_model"):
        if tf.io.gfile.exists(f"{saved_model}/saved_model.pb"):
            return f"{saved_model}/variables/variables"
    if tf.io.gfile.isdir(path):
        for folder in (path, f"{path}/checkpoint"):
            newest = tf.train.latest_checkpoint(folder)
            if newest:
                return newest
        raise StartPointError(f"{path}: no checkpoint in this folder")
    if not tf.io.gfile.glob(f"{path}.index"):
        raise StartPointError(f"{path}: no such checkpoint (no {path}.index)")
    return path


def _layout(prefix: str) -> str | None:
    """How one of our checkpoints nests the model: "model" (a SavedModel's variables: the
    model under `model/`) or "trainer" (the trainer's: its modules at the root); None for a
    checkpoint that is not ours (no params.yaml of ours beside it: a TF-Vision zoo one)."""
    import tensorflow as tf

    if source_classes(prefix) is None:
        return None
    roots = {name.split("/", 1)[0] for name, _ in tf.train.list_variables(prefix)}
    if "model" in roots:
        return "model"
    return "trainer" if {"backbone", "head"} <= roots else None


def _checkpoint(layout: str, **modules):
    """A checkpoint node reading `modules` (backbone, decoder, head) from either layout. The
    trainer saves them under those names (the model's `checkpoint_items`); in a SavedModel
    they hang off the model under its Keras attribute names, `_backbone`, `_head`, ..."""
    import tensorflow as tf

    if layout == "model":
        return tf.train.Checkpoint(model=tf.train.Checkpoint(
            **{f"_{name}": module for name, module in modules.items()}))
    return tf.train.Checkpoint(**modules)


def source_classes(prefix: str) -> int | None:
    """The class count (background included) of the model one of our checkpoints holds: its
    params.yaml lies beside it (a model dir) or in the SavedModel's assets.extra/."""
    import yaml

    folder = os.path.dirname(prefix)
    for params in (f"{folder}/params.yaml", f"{os.path.dirname(folder)}/assets.extra/params.yaml"):
        if storage.exists(params):
            found = (yaml.safe_load(storage.read_text(params)) or {}).get("task", {})
            return (found.get("model") or {}).get("num_classes")
    return None


def source_label_map(prefix: str) -> dict[str, int] | None:
    """The label map ({name: id}) of the model one of our checkpoints holds: beside it (a
    train model dir), in the SavedModel's assets.extra/, or in an export's saved_model/."""
    folder = os.path.dirname(prefix)
    parent = os.path.dirname(folder)
    for path in (f"{folder}/{LABEL_MAP_FILE}", f"{parent}/{ASSETS_EXTRA}/{LABEL_MAP_FILE}",
                 f"{parent}/saved_model/{ASSETS_EXTRA}/{LABEL_MAP_FILE}"):
        if storage.exists(path):
            return read_label_map(path)
    return None


def _restore(model, prefix: str, layout: str, target: dict[str, int], build) -> dict:
    """Restore `model` from one of our checkpoints; return what was restored.

    A head of another class count must not be restored whole: TF restores variables the
    model has not built yet when they are created, in the checkpoint's shape, so a whole-model
    restore would "succeed" and train a head with the old class count."""
    import tensorflow as tf

    num_classes = max(target.values(), default=0) + 1
    old_classes = source_classes(prefix) or num_classes
    source = source_label_map(prefix)
    if source is None:  # ids are append-only: an id the source model had means the same class
        source = {name: item_id for name, item_id in target.items() if item_id < old_classes}
    if old_classes == num_classes and source == target:
        try:
            whole = (tf.train.Checkpoint(model=model) if layout == "model"
                     else tf.train.Checkpoint(**model.checkpoint_items))
            whole.read(prefix).expect_partial().assert_existing_objects_matched()
            return {"modules": "all"}
        except (ValueError, AssertionError, tf.errors.InvalidArgumentError) as exc:
            _log(f"whole model does not fit ({str(exc).splitlines()[0][:160]}); "
                 "restoring backbone and decoder only")
            return {"modules": _restore_trunk(model, prefix, layout)}
    kept = sorted(set(source) & set(target), key=target.get)
    classes = {"kept": kept, "new": sorted(set(target) - set(source), key=target.get),
               "dropped": sorted(set(source) - set(target), key=source.get)}
    _log(f"the checkpoint has {old_classes - 1} classes, this run {num_classes - 1}: "
         f"keeping {', '.join(kept) or 'none'} by name; new: {', '.join(classes['new']) or 'none'}")
    if not class_transfer.is_retinanet_head(getattr(model, "head", None)):
        _log("not a RetinaNet head: restoring backbone and decoder only")
        return {"modules": _restore_trunk(model, prefix, layout), "classes": classes}
    build(model)  # the classifier is assigned, not restored: its variables must exist
    modules = _trunk(model)
    head, stand_in = class_transfer.head_node(model.head, old_classes)
    _checkpoint(layout, **modules, head=head).read(prefix).expect_partial() \
        .assert_existing_objects_matched()
    class_transfer.transfer_classifier(
        model.head, stand_in, class_transfer.class_sources(source, target, num_classes),
        old_classes)
    return {"modules": ",".join([*modules, "head"]), "classes": classes}


def _trunk(model) -> dict:
    return {name: module for name in ("backbone", "decoder")
            if (module := getattr(model, name, None)) is not None}  # some have no decoder


def _restore_trunk(model, prefix: str, layout: str) -> str:
    trunk = _trunk(model)
    _checkpoint(layout, **trunk).read(prefix).expect_partial() \
        .assert_existing_objects_matched()
    return ",".join(trunk)


def _builder(task, strategy):
    """Builds backbone, decoder and head of a detector by running them once on zeros."""
    def build(model) -> None:
        import tensorflow as tf

        with strategy.scope():
            features = model.backbone(tf.zeros([1, *task.task_config.model.input_size]))
            if getattr(model, "decoder", None) is not None:
                features = model.decoder(features)
            model.head(features)
    return build


def is_detector_checkpoint(init_checkpoint: str | None) -> bool:
    """Whether a start point is a trained detector of ours (production, a model dir, an
    export): a start from it refines that model rather than learning one."""
    return bool(init_checkpoint) and _layout(checkpoint_prefix(init_checkpoint)) is not None


def install(task, init_checkpoint: str | None, label_map: dict[str, int], strategy) -> dict:
    """Make `task.initialize` start from `init_checkpoint`; return what will be done.
    `label_map` is this run's: classes are carried over from our checkpoints by name."""
    if not init_checkpoint:
        return {"from": "scratch"}
    prefix = checkpoint_prefix(init_checkpoint)
    layout = _layout(prefix)
    if layout is None:
        task.task_config.init_checkpoint = prefix  # TF-Vision's initialize reads it
        _log(f"{prefix} via TF-Vision ({task.task_config.init_checkpoint_modules})")
        return {"from": prefix, "modules": str(task.task_config.init_checkpoint_modules)}
    info = {"from": prefix}

    def initialize(model) -> None:
        info.update(_restore(model, prefix, layout, label_map, _builder(task, strategy)))
        _log(f"restored {info['modules']} from {prefix}")

    task.initialize = initialize
    return info


def resolve(init_checkpoint: str | None, warm_start_from: str | None) -> dict:
    """The start point asked for: {'checkpoint': prefix or None, 'reason': ...}."""
    if init_checkpoint and warm_start_from:
        raise StartPointError(f"give {setting('train.init_checkpoint')} or "
                              f"{setting('warm_start_from')}, not both")
    if init_checkpoint:
        return {"checkpoint": init_checkpoint, "reason": "init checkpoint"}
    if warm_start_from:
        found = production_checkpoint(str(warm_start_from))
        if found is None:
            _log(f"no model in production under {warm_start_from} yet: from scratch")
            return {"checkpoint": None, "reason": "warm start asked, nothing in production"}
        return {"checkpoint": found[0], "reason": f"warm start from version {found[1]}",
                "production_version": found[1]}
    return {"checkpoint": None, "reason": "from scratch"}

