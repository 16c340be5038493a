"""Evaluation slices: which val images are new in this dataset version, which are old.

A gate on all val images at once lets a candidate that learned the new images and forgot the
old ones through (the new images pull the mean up). The dataset version's `diff.json` names
the images added or changed since its parent; the records' `source_ids.json` maps each val
image's COCO id (`image/source_id`) back to its image key. Slices over the val split:

- `all`: every val image (the top-level numbers of metrics.json);
- `new`: val images added or changed in this version (every val image when it has no parent);
- `old`: the other val images: what the production model was already trained and judged on.

Metrics per slice come from the same detections (pycocotools restricted to the slice's
images), so candidate and production are sliced identically and nothing is inferred twice.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from odapi_operators.core import storage
from odapi_operators.core.evaluation.bootstrap import Matches, matches_from
from odapi_operators.core.evaluation.coco_metrics import COCO_KEYS, coco_eval, summary
from odapi_operators.core.failures import Failure

SOURCE_IDS = "source_ids.json"


class SliceError(ValueError):
    """The diff or the records cannot say which val images are new."""
    failure = Failure.DATA


def read_diff(path: str | Path) -> dict:
    """A dataset version's diff: `parent` (or null) and the image keys `added` / `changed`."""
    try:
        diff = json.loads(storage.read_text(path))
    except (OSError, ValueError) as exc:
        raise SliceError(f"{path}: cannot read the dataset diff ({exc})") from exc
    if not isinstance(diff, dict) or "parent" not in diff:
        raise SliceError(f"{path}: not a dataset diff (a JSON object with `parent`, `added`, "
                         "`changed`)")
    for key in ("added", "changed"):
        if not isinstance(diff.get(key, []), list):
            raise SliceError(f"{path}: `{key}` must be a list of image keys")
    return diff


def image_keys(data_dir: str | Path) -> dict[int, str]:
    """COCO image id -> image key, from the records' source_ids.json."""
    path = f"{os.fspath(data_dir).rstrip('/')}/{SOURCE_IDS}"
    if not storage.exists(path):
        raise SliceError(f"{path} is missing: the records cannot map val images back to image "
                         "keys; rewrite them with this version of odapi to slice by diff")
    return {int(source_id): entry["key"]
            for source_id, entry in json.loads(storage.read_text(path)).items()}


def slice_images(image_ids: list[int], keys: dict[int, str] | None,
                 diff: dict | None) -> dict[str, list[int]]:
    """Image ids per slice; without a diff only `all` (nothing says what is new)."""
    ids = sorted(image_ids)
    if diff is None:
        return {"all": ids}
    if diff.get("parent") is None:
        return {"all": ids, "new": ids, "old": []}
    keys = keys or {}
    unknown = [i for i in ids if i not in keys]
    if unknown:
        raise SliceError(f"val image id(s) {unknown[:5]} are not in {SOURCE_IDS}: the records "
                         "and their id map disagree")
    fresh = set(diff.get("added", [])) | set(diff.get("changed", []))
    new = [i for i in ids if keys[i] in fresh]
    return {"all": ids, "new": new, "old": [i for i in ids if keys[i] not in fresh]}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _entry(metrics: dict, images: int, boxes: int) -> dict:
    return {"images": images, "boxes": boxes,
            **{k: _finite(metrics[k]) for k in COCO_KEYS},
            "per_class": metrics["per_class"], "per_class_AP50": metrics["per_class_AP50"]}


def score_slices(gt: dict, detections: list[dict],
                 slices: dict[str, list[int]]) -> tuple[dict[str, dict], Matches]:
    """COCO metrics per slice, and the per-image matches of `all` (with each slice's ids)."""
    evaluated: dict[tuple[int, ...], Any] = {}
    boxes: dict[int, int] = {}
    for annotation in gt["annotations"]:
        boxes[annotation["image_id"]] = boxes.get(annotation["image_id"], 0) + 1
    result = {}
    for name, ids in slices.items():
        if not ids:
            result[name] = {"images": 0, "boxes": 0, **dict.fromkeys(COCO_KEYS),
                            "per_class": {}, "per_class_AP50": {},
                            "note": "no val image in this slice"}
            continue
        key = tuple(ids)
        if key not in evaluated:
            evaluated[key] = coco_eval(gt, detections, None if name == "all" else ids)
        result[name] = _entry(summary(evaluated[key], gt), len(ids),
                              sum(boxes.get(i, 0) for i in ids))
    everything = evaluated.get(tuple(slices["all"])) or coco_eval(gt, detections)
    return result, replace(matches_from(everything), slices={
        name: np.asarray(ids, dtype=np.int64) for name, ids in slices.items()})
