"""COCO evaluation with pycocotools: ground truth from our TFRecords, overall and per-class AP.

Ground truth and detections are plain COCO JSON (pixels, [x, y, w, h]); image ids are the
records' decimal `image/source_id`, category ids the label map's ids.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

# COCOeval.stats, in order.
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10", "ARmax100",
             "ARs", "ARm", "ARl")


def _feature(example, key: str) -> list:
    feature = example.features.feature[key]
    return list(feature.bytes_list.value or feature.float_list.value or feature.int64_list.value)


def image_entry(example) -> tuple[dict, list[dict]]:
    """(COCO image, its annotations without ids) from a parsed tf.train.Example."""
    image_id = int(_feature(example, "image/source_id")[0])
    height = int(_feature(example, "image/height")[0])
    width = int(_feature(example, "image/width")[0])
    name = (_feature(example, "image/filename") or [b""])[0].decode()
    boxes = zip(*(_feature(example, f"image/object/bbox/{k}")
                  for k in ("xmin", "ymin", "xmax", "ymax")), strict=True)
    labels = _feature(example, "image/object/class/label")
    crowd = _feature(example, "image/object/is_crowd") or [0] * len(labels)
    annotations = []
    for (x0, y0, x1, y1), label, is_crowd in zip(boxes, labels, crowd, strict=True):
        w, h = (x1 - x0) * width, (y1 - y0) * height
        annotations.append({"image_id": image_id, "category_id": int(label),
                            "bbox": [x0 * width, y0 * height, w, h], "area": w * h,
                            "iscrowd": int(is_crowd)})
    return {"id": image_id, "file_name": name, "width": width, "height": height}, annotations


def ground_truth(examples: Iterable[bytes], label_map: dict[str, int]) -> dict:
    """A COCO dataset dict from serialized tf.train.Examples."""
    from tensorflow.core.example import example_pb2

    images, annotations = [], []
    for raw in examples:
        image, boxes = image_entry(example_pb2.Example.FromString(raw))
        images.append(image)
        annotations.extend(boxes)
    for index, annotation in enumerate(annotations, start=1):
        annotation["id"] = index
    categories = [{"id": i, "name": n} for n, i in sorted(label_map.items(), key=lambda x: x[1])]
    return {"images": images, "annotations": annotations, "categories": categories}


def detection_entries(image: dict, boxes: np.ndarray, scores: np.ndarray,
                      classes: np.ndarray) -> list[dict]:
    """COCO results for one image from normalized [ymin, xmin, ymax, xmax] boxes."""
    height, width = image["height"], image["width"]
    return [{"image_id": image["id"], "category_id": int(c),
             "bbox": [float(x0 * width), float(y0 * height), float((x1 - x0) * width),
                      float((y1 - y0) * height)], "score": float(s)}
            for (y0, x0, y1, x1), s, c in zip(boxes, scores, classes)]


def _class_ap(precision: np.ndarray) -> float:
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


def coco_eval(gt: dict, detections: list[dict], image_ids: Iterable[int] | None = None) -> Any:
    """A pycocotools COCOeval, evaluated, accumulated and summarized (on `image_ids` only, if
    given). Its `evalImgs` hold the per-image matches the gate's bootstrap resamples."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints; stdout is the summary
        coco = COCO()
        coco.dataset = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
        coco.createIndex()
        results = coco.loadRes([dict(d) for d in detections]) if detections else COCO()
        if not detections:
            results.dataset = {"images": gt["images"], "categories": gt["categories"],
                               "annotations": []}
            results.createIndex()
        evaluator = COCOeval(coco, results, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def summary(evaluator: Any, gt: dict) -> dict:
    """COCO bbox metrics plus `per_class` AP and `per_class_AP50` (-1: no ground truth)."""
    metrics = {key: float(value) for key, value in zip(COCO_KEYS, evaluator.stats)}
    precision = evaluator.eval["precision"]  # [IoU, recall, class, area, max dets]
    names = {c["id"]: c["name"] for c in gt["categories"]}
    metrics["per_class"], metrics["per_class_AP50"] = {}, {}
    for k, category in enumerate(evaluator.params.catIds):
        metrics["per_class"][names[category]] = _class_ap(precision[:, :, k, 0, -1])
        metrics["per_class_AP50"][names[category]] = _class_ap(precision[0, :, k, 0, -1])
    return metrics


def coco_metrics(gt: dict, detections: list[dict]) -> dict:
    """COCO bbox metrics plus `per_class` AP and `per_class_AP50` (-1: no ground truth)."""
    return summary(coco_eval(gt, detections), gt)
