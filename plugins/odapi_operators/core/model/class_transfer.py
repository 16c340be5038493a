"""Carry a trained RetinaNet head over to a model whose classes changed.

TF-Vision's `RetinaNetHead` (official/vision/modeling/heads/dense_prediction_heads.py) has two
conv towers (class net, box net) that do not depend on the classes, a box regressor, and one
class-dependent conv, `scores` (`_classifier`), with num_anchors_per_location x num_classes
output channels. The RetinaNet loss and detection generator reshape its output to
[..., anchors, num_classes], so channel `a * num_classes + c` is anchor a's sigmoid logit for
class c; class 0 is background, a logit like the others that the detection generator drops.

A warm start after an export added (or renumbered) classes keeps everything the production
model learned: towers and box regressor whole, and each class's channels moved by *name* to
its id in the new label map (background stays 0). A class production never saw keeps the new
model's own initial values: TF-Vision's prior-probability bias, -log((1 - 0.01) / 0.01), and a
near-zero kernel, so it starts at p = 0.01 as in any fresh RetinaNet.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_CLASSIFIER = "_classifier"
# Every RetinaNetHead module whose shapes do not depend on num_classes (the attribute heads
# exist only when configured).
_CLASS_FREE = ("_cls_convs", "_cls_norms", "_box_convs", "_box_norms", "_box_regressor",
               "_att_convs", "_att_norms", "_att_predictors")


def class_sources(source: dict[str, int], target: dict[str, int],
                  target_classes: int) -> list[int | None]:
    """For each class index of the target model (0 = background), the source model's index
    of the same class name, or None for a class the source never learned."""
    by_id = {item_id: source.get(name) for name, item_id in target.items()}
    return [0] + [by_id.get(index) for index in range(1, target_classes)]


def map_class_channels(source_value: np.ndarray, target_value: np.ndarray,
                       sources: list[int | None], source_classes: int) -> np.ndarray:
    """`target_value` with its class channels (last axis, anchor-major) taken from
    `source_value` where `sources` names a source class; the others keep the target's."""
    target_classes = len(sources)
    anchors, rest = divmod(target_value.shape[-1], target_classes)
    if rest or source_value.shape[-1] != anchors * source_classes \
            or source_value.shape[:-1] != target_value.shape[:-1]:
        raise ValueError(f"classifier shapes {source_value.shape} ({source_classes} classes) "
                         f"and {target_value.shape} ({target_classes} classes) do not share "
                         "their anchors and inputs")
    source_split = source_value.reshape(*source_value.shape[:-1], anchors, source_classes)
    result = target_value.reshape(*target_value.shape[:-1], anchors, target_classes).copy()
    for index, source_index in enumerate(sources):
        if source_index is not None:
            result[..., index] = source_split[..., source_index]
    return result.reshape(target_value.shape)


def is_retinanet_head(head: Any) -> bool:
    from official.vision.modeling.heads.dense_prediction_heads import RetinaNetHead

    return isinstance(head, RetinaNetHead)


def head_node(head: Any, source_classes: int):
    """(checkpoint node, stand-in classifier) for reading a trained head of `source_classes`
    classes into the built `head`: its class-independent modules under their own names, and
    `scores` into a stand-in conv of the checkpoint's shape (the real one has other output
    channels), for transfer_classifier to map."""
    import tensorflow as tf

    classifier = head._classifier
    anchors = classifier.weights[-1].shape[-1] // head.get_config()["num_classes"]
    shape = {name: getattr(classifier, name) for name in ("kernel_size", "strides", "padding",
                                                           "use_bias", "depth_multiplier")
             if hasattr(classifier, name)}  # depth_multiplier: a separable conv's
    stand_in = type(classifier)(filters=anchors * source_classes, **shape)
    stand_in.build(tf.TensorShape([None, None, None, classifier.weights[0].shape[2]]))
    modules = {name: getattr(head, name) for name in _CLASS_FREE if getattr(head, name, None)}
    return tf.train.Checkpoint(**modules, _classifier=stand_in), stand_in


def transfer_classifier(head: Any, stand_in: Any, sources: list[int | None],
                        source_classes: int) -> None:
    """Assign the built head's `scores` conv from the restored stand-in, class channels
    mapped by `sources` (a separable conv's depthwise kernel has no class axis: copied)."""
    for variable, stored in zip(head._classifier.weights, stand_in.weights, strict=True):
        value = stored.numpy()
        if "depthwise_kernel" not in variable.name:
            value = map_class_channels(value, variable.numpy(), sources, source_classes)
        variable.assign(value)
