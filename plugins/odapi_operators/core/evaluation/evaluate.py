"""Evaluate stage (TensorFlow; child process): COCO metrics of a checkpoint or SavedModel.

The model (the candidate's newest checkpoint, or the SavedModel Serving holds) runs over every
image of the val split; pycocotools' COCOeval scores its detections against the records'
boxes. Next to `metrics.json` (COCO stats, per-class AP and AP50; per slice under `slices`,
see slices.py) the stage writes `detections.json` and `ground_truth.json` (COCO JSON) for the
report and for anyone who wants to look closer, and `matches.npz`, the per-image matches the
gate's bootstrap resamples (see bootstrap.py) without TensorFlow or a second inference.
Candidate and production go through the same code on the same split and the same slices.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from odapi_operators.core import storage
from odapi_operators.core.data.label_map import read_label_map
from odapi_operators.core.evaluation.bootstrap import write_matches
from odapi_operators.core.evaluation.coco_metrics import COCO_KEYS, detection_entries, ground_truth
from odapi_operators.core.evaluation.slices import image_keys, read_diff, score_slices, slice_images
from odapi_operators.core.failures import Failure
from odapi_operators.core.layout import MATCHES
from odapi_operators.core.model import tfvision

if TYPE_CHECKING:
    from odapi_operators.core.model.detector import Detector

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


def evaluate(model: str | Path, data_dir: str | Path, out_file: str | Path, *,
             min_images: int = 1, missing_classes: Literal["fail", "warn"] = "fail",
             diff: str | Path | None = None, detector: Detector | None = None) -> dict:
    """Evaluate `model` (model dir or SavedModel) on the val split of `data_dir`; with the
    dataset version's `diff`, also on its `new` and `old` val images. `detector`: `model`
    already loaded (by a caller that goes on using it)."""
    from odapi_operators.core.model.detector import load_detector

    examples, label_map = val_split(data_dir)
    gt = ground_truth(examples, label_map)
    missing = _check_split(gt, data_dir, min_images, missing_classes)
    slices = slice_images([image["id"] for image in gt["images"]],
                          image_keys(data_dir) if diff is not None else None,
                          read_diff(diff) if diff is not None else None)
    started = time.monotonic()
    detector = detector or load_detector(model)
    detections: list[dict] = []
    for image, example in zip(gt["images"], examples, strict=True):
        found = detector.detect(example)
        detections += detection_entries(image, found.boxes, found.scores, found.classes)
    seconds = time.monotonic() - started
    result = score(gt, detections, Path(out_file), slices, diff=diff)
    result.update(classes_without_ground_truth=missing, model=detector.path,
                  model_kind=detector.kind, seconds=round(seconds, 1))
    storage.write_text(out_file, json.dumps(result, indent=2))
    return {**result, "metrics": str(out_file)}


def score(gt: dict, detections: list[dict], out_file: Path, slices: dict[str, list[int]], *,
          diff: str | Path | None = None) -> dict:
    """Score detections per slice; write detections, ground truth and matches beside
    `out_file`; return metrics.json's content: slice `all` at the top level (what readers of
    earlier versions read), every slice under `slices`."""
    per_slice, matches = score_slices(gt, detections, slices)
    out_dir = out_file.parent
    storage.write_text(out_dir / "detections.json", json.dumps(detections))
    storage.write_text(out_dir / "ground_truth.json", json.dumps(gt))
    write_matches(out_dir / MATCHES, matches)
    overall = per_slice["all"]
    return {**{k: overall[k] for k in COCO_KEYS},
            "per_class": overall["per_class"], "per_class_AP50": overall["per_class_AP50"],
            "eval_images": overall["images"], "eval_boxes": overall["boxes"],
            "slices": per_slice, "diff": str(diff) if diff is not None else None,
            "matches": MATCHES}
