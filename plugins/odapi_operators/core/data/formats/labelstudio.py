"""Label Studio JSON and JSON-MIN exports: lists of tasks, or of flat annotation records.

Boxes are `rectanglelabels` results whose `x, y, width, height` are PERCENT of the image,
anchored at the top-left corner; `rotation` turns the rectangle clockwise (degrees) about that
corner, in pixels, so a rotated box needs `original_width/height` and becomes the axis-aligned
envelope of its four corners. One annotation per task is used: a ground-truth one first, else
the latest; cancelled and superseded annotations are reported. A task whose box results were
all refused is dropped; one without any is a negative. Predictions are model output,
never labels: a task with only predictions is an unlabeled task. An annotation made from a
prediction (`parent_prediction`) keeps that prediction's `model_version` in its provenance.

JSON-MIN (label-studio-sdk's `Converter.convert_to_json_min`) writes one flat record per
annotation that was not cancelled: the task's data fields at the top level (`image`), the task
`id`, `annotation_id`, `created_at`, `updated_at`, and one key per control tag (`label`)
holding the values of its results, each with `original_width/height` and without `type`. A
task annotated twice gives two records: the latest is used, the other reported as superseded
(JSON-MIN has no ground-truth flag and no predictions, so no `model_version`). A record
without `annotation_id` is a task nobody annotated. Both layouts may share a file: a record
with a `data` object and no `annotation_id` is a full task.

`data.image` (JSON-MIN: `image`) is where Label Studio serves the image from:
`/data/upload/<project>/<name>` (uploads, stored as `<8 hex>-<original name>`),
`/data/local-files/?d=<path>` (local storage), or a URL. Served paths are looked up inside
the images root (else the export's folder) by their `d=` path or file name, never outside it.
"""

from __future__ import annotations

import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from odapi_operators.core.data.boxes import checked_box, normalized_box
from odapi_operators.core.data.formats.common import (
    brief,
    image_size,
    is_number,
    json_root_char,
    kept,
    no_usable_box,
    read_json_document,
    scalar,
)
from odapi_operators.core.data.manifest import Box, ImageRecord, ImageSource
from odapi_operators.core.rejections import RecordError

if TYPE_CHECKING:
    from odapi_operators.core.data.formats import ParseContext

NAME = "labelstudio"
SUFFIXES = (".json",)

BOX_TYPE = "rectanglelabels"
# Result types that say something about the whole task, not a region: nothing is lost.
TASK_LEVEL_TYPES = {"choices", "textarea", "rating", "taxonomy", "number", "datetime",
                    "pairwise", "ranker", "relation"}
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(.+)$")
# Keys of a JSON-MIN record that are not task data nor results (the converter adds them).
MIN_META = {"id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time",
            "agreement"}
_MIN_TASK_LEVEL = {"choices", "text", "rating", "taxonomy", "number", "datetime", "ranker",
                   "pairwise", "labels_relations"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_SNIFF_KEYS = (b'"annotations"', b'"data"', b'"annotation_id"', BOX_TYPE.encode())


def sniff(path: Path, head: bytes) -> bool:
    """A JSON array of tasks (JSON) or annotation records (JSON-MIN). COCO files are JSON
    objects, so it never claims one."""
    return json_root_char(head) == b"[" and any(key in head for key in _SNIFF_KEYS)


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def _recency(annotation: dict) -> tuple:
    """Sort key: ground truth first, then latest update/creation, then highest id."""
    stamp = _timestamp(annotation.get("updated_at")) or _timestamp(annotation.get("created_at"))
    ident = annotation.get("id")
    return (bool(annotation.get("ground_truth")),
            stamp is not None, stamp or datetime.min.replace(tzinfo=timezone.utc),
            ident if is_number(ident) else -math.inf)


def _served_candidates(image: str) -> list[str] | None:
    """Names to look up for an image Label Studio serves itself; None if not such a path."""
    parts = urlsplit(image)
    if parts.scheme or parts.netloc:
        return None
    if parts.path.startswith("/data/local-files"):
        wanted = parse_qs(parts.query).get("d", [""])[0]
        if not wanted:
            raise ValueError(f"bad image reference: {brief(image)} has no ?d= path")
        return [wanted, PurePosixPath(wanted).name]
    if parts.path.startswith("/data/upload/"):
        name = unquote(PurePosixPath(parts.path).name)
        stripped = _UPLOAD_PREFIX.match(name)
        return [name] + ([stripped.group(1)] if stripped else [])
    return None


def _locate(image: Any, ctx: ParseContext, folder: Path, file: str,
            record: str) -> tuple[str, ImageSource]:
    try:
        candidates = _served_candidates(image) if isinstance(image, str) else None
    except ValueError as exc:
        raise RecordError(file, record, str(exc)) from None
    if not candidates:
        return ctx.locate(image, folder, file, record)
    paths = []
    for name in candidates:
        try:
            paths.append(ctx.resolve_image(name, relative_to=folder))
        except ValueError as exc:  # the first refusal wins: no falling back past an escape
            raise RecordError(file, record, str(exc)) from None
    path = next((p for p in paths if os.path.isfile(p)), paths[0])
    return ctx.image_key(path, folder), ImageSource("local", str(path))


def _envelope(value: dict, size: tuple[int, int] | None) -> tuple[float, float, float, float]:
    """Pixel (xmin, ymin, xmax, ymax) of a rectangle rotated clockwise about its top-left."""
    if size is None:
        raise ValueError("missing image size: a rotated box needs original_width/height")
    width, height = size
    x0, y0 = value["x"] * width / 100, value["y"] * height / 100
    w, h = value["width"] * width / 100, value["height"] * height / 100
    angle = math.radians(value["rotation"])
    cos, sin = math.cos(angle), math.sin(angle)
    xs = [x0 + dx * cos - dy * sin for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    ys = [y0 + dx * sin + dy * cos for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    if not all(math.isfinite(c) for c in xs + ys):  # min/max would quietly drop a NaN
        return (math.nan,) * 4
    return min(xs), min(ys), max(xs), max(ys)


def _result_boxes(result: dict) -> list[Box]:
    """Boxes of one `rectanglelabels` result (one per label); raises ValueError."""
    value = result.get("value")
    if not isinstance(value, dict):
        raise ValueError("bad result: no value")
    coords = [value.get(k) for k in ("x", "y", "width", "height")]
    rotation = value.get("rotation") or 0
    if not all(is_number(c) for c in coords) or not is_number(rotation):
        raise ValueError(f"bad result: x/y/width/height/rotation must be numbers, got "
                         f"{brief(coords + [rotation])}")
    labels = value.get(BOX_TYPE)
    if not isinstance(labels, list) or not labels or not all(isinstance(n, str) for n in labels):
        raise ValueError(f"bad result: no label in value.{BOX_TYPE} ({brief(labels)})")
    if math.isfinite(rotation) and rotation % 360 == 0:
        x, y, w, h = coords
        return [checked_box(label, x / 100, y / 100, (x + w) / 100, (y + h) / 100)
                for label in labels]
    size = image_size(result.get("original_width"), result.get("original_height"))
    envelope = _envelope({**value, "rotation": rotation}, size)
    return [normalized_box(label, *envelope, *size) for label in labels]


def _chosen_annotation(task: dict, file: str, record: str, ctx: ParseContext) -> dict | None:
    """The annotation to use; every other one is reported."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    live = []
    for annotation in annotations:
        if annotation.get("was_cancelled"):
            ctx.log.add(RecordError(file, f"{record} annotation {brief(annotation.get('id'))}",
                                    "cancelled annotation: skipped").rejection)
        else:
            live.append(annotation)
    if not live:
        detail = (f"all {len(annotations)} annotations were cancelled" if annotations else
                  "no annotations (predictions are not labels)")
        ctx.log.add(RecordError(file, record, f"unlabeled task: {detail}").rejection)
        return None
    chosen = max(live, key=_recency)
    why = "ground truth" if chosen.get("ground_truth") else "latest"
    for annotation in live:
        if annotation is not chosen:
            ctx.log.add(RecordError(
                file, f"{record} annotation {brief(annotation.get('id'))}",
                f"superseded annotation: annotation {brief(chosen.get('id'))} ({why}) is used"
            ).rejection)
    return chosen


def _source_model_version(task: dict, annotation: dict) -> Any:
    """The `model_version` of the prediction an annotation was made from, else None.

    Label Studio names that prediction in `parent_prediction` (an id). Its export lists the
    task's predictions in full or by id only, and inlines in the annotation's `prediction` the
    prediction *shown* when it was saved (the project's current model version), which is the
    parent only if the ids match: an annotation drawn from scratch has one too."""
    parent = annotation.get("parent_prediction")
    if not isinstance(parent, (int, str)) or isinstance(parent, bool):
        return None  # an id; comparing a deep structure would recurse
    for prediction in [annotation.get("prediction"), *(task.get("predictions") or [])]:
        if isinstance(prediction, dict) and prediction.get("id") == parent:
            return scalar(prediction.get("model_version"))
    return None


def _collected_boxes(results: Iterable[tuple[str, Any]], file: str, record: str,
                     ctx: ParseContext) -> tuple[list[Box], tuple[int, int] | None]:
    """Boxes and image size of one annotation's (where, result) pairs; task-level results
    are skipped, every other refused result is reported, and an annotation whose box results
    were all refused raises (keeping it would teach the model its objects are background)."""
    boxes: list[Box] = []
    size = None
    refused = 0
    for where, result in results:
        kind = result.get("type") if isinstance(result, dict) else None
        if isinstance(kind, str) and kind in TASK_LEVEL_TYPES:
            continue
        try:
            if kind != BOX_TYPE:
                raise ValueError(f"unsupported result type: {brief(kind)} is not a box")
            size = size or image_size(result.get("original_width"), result.get("original_height"))
            boxes.extend(_result_boxes(result))
        except ValueError as exc:
            refused += 1
            ctx.log.add(RecordError(file, where, str(exc)).rejection)
    if refused and not boxes:
        raise no_usable_box(file, record, refused, "results")
    return boxes, size


def _task_record(task: dict, index: int, folder: Path, file: str,
                 ctx: ParseContext) -> ImageRecord | None:
    if not isinstance(task, dict):
        raise RecordError(file, f"tasks[{index}]", "bad task: not a JSON object")
    task_id = scalar(task.get("id"))
    named = isinstance(task.get("id"), (int, str)) and not isinstance(task.get("id"), bool)
    record = f"task {task_id}" if named else f"tasks[{index}]"  # never "task [[[...]]]"
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    key, source = _locate(data.get("image"), ctx, folder, file, record)
    annotation = _chosen_annotation(task, file, record, ctx)
    if annotation is None:
        return None
    chosen = f"{record} annotation {brief(annotation.get('id'))}"
    results = annotation.get("result") or []
    if not isinstance(results, list):
        raise RecordError(file, chosen, f"bad annotation: result is {type(results).__name__}, "
                                        "not a list")
    boxes, size = _collected_boxes(((f"{chosen} result[{number}]", result)
                                    for number, result in enumerate(results)),
                                   file, record, ctx)
    provenance = {"format": NAME, "file": file, "element": f"tasks[{index}]",
                  "task": task_id, "annotation": scalar(annotation.get("id"))}
    model_version = _source_model_version(task, annotation)
    if model_version is not None:  # pre-annotated: which model proposed the boxes
        provenance["model_version"] = model_version
    width, height = size or (None, None)
    return ImageRecord(key=key, source=source,
                       source_id=str(task_id if task_id is not None else index), width=width,
                       height=height, boxes=tuple(boxes), provenance=provenance)


# --- JSON-MIN --------------------------------------------------------------------------------

def is_min_record(item: Any) -> bool:
    """A JSON-MIN record: flat, with `annotation_id` (null for an unannotated task), or
    without any of a full task's `data`, `annotations` and `predictions`."""
    return isinstance(item, dict) and ("annotation_id" in item or not any(
        key in item for key in ("data", "annotations", "predictions")))


def _min_result(value: Any) -> dict | None:
    """A JSON-MIN result value as a full-format result (`type`, `value`, `original_*`), or
    None if `value` is not a region result (task data, a prettified choice)."""
    if not isinstance(value, dict):
        return None
    labels = [key for key in value if isinstance(key, str) and key.endswith("labels")]
    if BOX_TYPE in value or (not labels and all(k in value for k in ("x", "y", "width"))):
        kind = BOX_TYPE  # a box without labels is refused by _result_boxes, naming why
    elif labels:
        kind = labels[0]  # polygonlabels, keypointlabels, brushlabels: not boxes
    elif _MIN_TASK_LEVEL & set(value):
        kind = "choices"
    else:
        return None
    return {"type": kind, "value": value, "original_width": value.get("original_width"),
            "original_height": value.get("original_height")}


def _min_results(item: dict, where: str) -> Iterator[tuple[str, dict]]:
    """(where, result) for every region result of a JSON-MIN record, one key per tag."""
    for key, values in item.items():
        if key in MIN_META or not isinstance(values, list):
            continue
        for number, value in enumerate(values):
            result = _min_result(value)
            if result is not None:
                yield f"{where} {key}[{number}]", result


def _min_image(item: dict) -> Any:
    """The image reference: `image` (the usual `$image`), else the one data field that names
    an image Label Studio serves or an image file."""
    if "image" in item:
        return item["image"]
    named = [v for k, v in item.items() if k not in MIN_META and isinstance(v, str)
             and (v.startswith("/data/") or PurePosixPath(v.split("?", 1)[0]).suffix.lower()
                  in IMAGE_SUFFIXES)]  # no urlsplit: it raises on text like "http://[x"
    return named[0] if len(named) == 1 else None



def _min_annotation(item: dict) -> dict:
    """The fields of a JSON-MIN record that `_recency` sorts annotations by."""
    return {"id": item.get("annotation_id"), "created_at": item.get("created_at"),
            "updated_at": item.get("updated_at")}


def _min_task_record(task_id: Any, items: list[tuple[int, dict]], folder: Path, file: str,
                     ctx: ParseContext) -> ImageRecord | None:
    """The record of one task from its JSON-MIN records (one per annotation)."""
    index, first = items[0]
    record = f"task {task_id}" if task_id is not None else f"tasks[{index}]"
    key, source = _locate(_min_image(first), ctx, folder, file, record)
    annotated = [(i, item) for i, item in items if item.get("annotation_id") is not None]
    if not annotated:
        ctx.log.add(RecordError(file, record, "unlabeled task: no annotations (JSON-MIN "
                                              "record without annotation_id)").rejection)
        return None
    index, item = max(annotated, key=lambda pair: _recency(_min_annotation(pair[1])))
    chosen = f"{record} annotation {brief(item.get('annotation_id'))}"
    for _, other in annotated:
        if other is not item:
            ctx.log.add(RecordError(
                file, f"{record} annotation {brief(other.get('annotation_id'))}",
                f"superseded annotation: annotation {brief(item.get('annotation_id'))} "
                "(latest) is used").rejection)
    boxes, size = _collected_boxes(_min_results(item, chosen), file, record, ctx)
    width, height = size or (None, None)
    return ImageRecord(key=key, source=source,
                       source_id=str(task_id if task_id is not None else index), width=width,
                       height=height, boxes=tuple(boxes),
                       provenance={"format": NAME, "layout": "json-min", "file": file,
                                   "element": f"tasks[{index}]", "task": task_id,
                                   "annotation": scalar(item.get("annotation_id"))})


def _min_tasks(items: list[tuple[int, dict]]) -> Iterator[tuple[Any, list[tuple[int, dict]]]]:
    """JSON-MIN records grouped by task id, in order of first appearance (no id: alone)."""
    groups: dict[Any, list[tuple[int, dict]]] = {}
    for index, item in items:
        task_id = item.get("id")
        named = isinstance(task_id, (int, str)) and not isinstance(task_id, bool)
        groups.setdefault(task_id if named else ("index", index), []).append((index, item))
    for task_id, group in groups.items():
        yield (None if isinstance(task_id, tuple) else task_id), group


def parse_labelstudio_file(json_path: Path, ctx: ParseContext) -> Iterator[ImageRecord]:
    file = str(json_path)
    tasks = read_json_document(json_path)
    if not isinstance(tasks, list):
        raise RecordError(file, "document", "not a Label Studio export: not a list of tasks")
    folder = Path(json_path).parent
    minimal = []
    for index, task in enumerate(tasks):
        if is_min_record(task):
            minimal.append((index, task))
            continue
        record = kept(ctx.log, lambda: _task_record(task, index, folder, file, ctx))
        if record is not None:
            yield record
    for task_id, items in _min_tasks(minimal):
        record = kept(ctx.log, lambda: _min_task_record(task_id, items, folder, file, ctx))
        if record is not None:
            yield record


def parse(files: list[Path], ctx: ParseContext) -> Iterator[ImageRecord]:
    """Parse the Label Studio exports of one export folder; a bad file is logged and skipped."""
    from odapi_operators.core.data.formats import parse_each

    return parse_each(files, ctx, parse_labelstudio_file)