"""Evaluate stage (TensorFlow; child process): COCO metrics of a checkpoint or SavedModel.

The model (the candidate's newest checkpoint, or the SavedModel Serving holds) runs over every
image of the val split; pycocotools' COCOeval scores its detections against the records'
boxes. Next to `metrics.json` (COCO stats, per-class AP and AP50) the stage writes
`detections.json` and `ground_truth.json` (COCO JSON) for the report and for anyone who wants
to look closer. Candidate and production go through the same code on the same split.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Literal

from odapi_operators.core import storage
from odapi_operators.core.data.label_map import read_label_map
from odapi_operators.core.evaluation.coco_metrics import (
    COCO_KEYS,
    coco_metrics,
    detection_entries,
    ground_truth,
)
from odapi_operators.core.failures import Failure
from odapi_operators.core.model import tfvision

__all__ = ["COCO_KEYS", "EvaluationError", "evaluate", "val_split"]


class EvaluationError(ValueError):
    """The eval split cannot give an honest number (empty, too small, classes missing)."""
    failure = Failure.REFUSED


def val_split(data_dir: str | Path) -> tuple[list[bytes], dict[str, int]]:
    """Every serialized example of the val split, and the records' label map."""
    summary = tfvision.read_data_summary(data_dir)
    if not (summary["splits"].get("val") or {}).get("images"):
        raise EvaluationError(f"{data_dir}: the val split is empty; nothing to evaluate on")
    return tfvision.val_examples(data_dir), read_label_map(summary["label_map"])


def _check_split(gt: dict, data_dir: str | Path, min_images: int,
                 missing_classes: Literal["fail", "warn"]) -> list[str]:
    """Refuse a split too small or lacking a class; return the classes without boxes."""
    if len(gt["images"]) < min_images:
        raise EvaluationError(f"{data_dir}: the val split has {len(gt['images'])} images, "
                              f"fewer than the minimum of {min_images}")
    present = {a["category_id"] for a in gt["annotations"]}
    missing = [c["name"] for c in gt["categories"] if c["id"] not in present]
    if missing and missing_classes == "fail":
        raise EvaluationError(f"{data_dir}: the val split has no box of class(es) "
                              f"{', '.join(missing)}: their AP would be undefined; add "
                              "labelled images of them or set evaluate.missing_classes: warn")
    for name in missing:
        print(f"warning: no val box of class {name!r}; its AP is -1", file=sys.stderr)
    return missing


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evaluate(model: str | Path, data_dir: str | Path, out_file: str | Path, *,
             min_images: int = 1, missing_classes: Literal["fail", "warn"] = "fail") -> dict:
    """Evaluate `model` (model dir or SavedModel) on the val split of `data_dir`."""
    from odapi_operators.core.model.detector import load_detector

    examples, label_map = val_split(data_dir)
    gt = ground_truth(examples, label_map)
    missing = _check_split(gt, data_dir, min_images, missing_classes)
    started = time.monotonic()
    detector = load_detector(model)
    detections: list[dict] = []
    for image, example in zip(gt["images"], examples, strict=True):
        found = detector.detect(example)
        detections += detection_entries(image, found.boxes, found.scores, found.classes)
    seconds = time.monotonic() - started
    metrics = coco_metrics(gt, detections)
    out_dir = Path(out_file).parent
    storage.write_text(out_dir / "detections.json", json.dumps(detections))
    storage.write_text(out_dir / "ground_truth.json", json.dumps(gt))
    result = {**{k: _finite(v) for k, v in metrics.items() if k in COCO_KEYS},
              "per_class": metrics["per_class"], "per_class_AP50": metrics["per_class_AP50"],
              "classes_without_ground_truth": missing,
              "eval_images": len(gt["images"]), "eval_boxes": len(gt["annotations"]),
              "model": detector.path, "model_kind": detector.kind,
              "seconds": round(seconds, 1)}
    storage.write_text(out_file, json.dumps(result, indent=2))
    return {**result, "metrics": str(out_file)}
