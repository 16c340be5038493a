"""Pre-annotated labeling tasks for Prodigy and Label Studio, from a model's proposed boxes.

The inverse of our Prodigy and Label Studio parsers (core/formats), so an accepted Prodigy task
or a submitted Label Studio annotation that keeps the proposals ingests to the same boxes,
with the proposing model's version in the record's provenance:

- Prodigy (`image.manual`, `--loader jsonl`): one task a line: `image` (a data URI, as
  Prodigy's own Images loader makes, or a URL/path), `width`, `height`, `spans` of
  `{label, points (4 corners), x, y, width, height, type: rect, score}` in original pixels,
  and `meta` with `score` (the image's informativeness) and `model_version`, which Prodigy
  shows on the card and keeps in `db-out`.
- Label Studio import JSON: a list of `{data: {image}, predictions: [{model_version, score,
  result: [rectanglelabels in percent of the image]}]}`; an annotation submitted from it names
  the prediction as its `parent_prediction`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

from odapi_operators.core import storage
from odapi_operators.core.data.content import sniff_format

FORMATS = ("prodigy", "labelstudio")
TASK_FILES = {"prodigy": "tasks.jsonl", "labelstudio": "tasks.json"}
LOCAL_FILES_PREFIX = "/data/local-files/?d="  # Label Studio's local storage URL
_PIXELS = 2  # decimals of pixel coordinates (Prodigy)
_PERCENT = 4  # decimals of percent coordinates (Label Studio)
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
         "BMP": "image/bmp"}


@dataclass(frozen=True)
class Proposal:
    """One box a model proposes: normalized corners, class name, score."""

    label: str
    score: float
    xmin: float
    ymin: float
    xmax: float
    ymax: float


def data_uri(data: bytes) -> str:
    """`data:image/...;base64,...` for encoded image bytes."""
    mime = _MIME.get(sniff_format(data[:16]) or "", "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def labelstudio_image(reference: str, local: bool) -> str:
    """How Label Studio names an image: URLs and gs:// as they are, a pool-relative path
    through its local storage (`LOCAL_FILES_DOCUMENT_ROOT` = the pool folder)."""
    return LOCAL_FILES_PREFIX + quote(reference, safe="/") if local else reference


def prodigy_task(image: str, width: int, height: int, proposals: Iterable[Proposal],
                 model_version: str, score: float, *, path: str | None = None,
                 meta: dict | None = None) -> dict:
    """One `image.manual` task; `path` names the image when `image` is a data URI."""
    spans = []
    for p in proposals:
        x0, y0 = round(p.xmin * width, _PIXELS), round(p.ymin * height, _PIXELS)
        x1, y1 = round(p.xmax * width, _PIXELS), round(p.ymax * height, _PIXELS)
        spans.append({"label": p.label, "type": "rect",
                      "points": [[x0, y0], [x0, y1], [x1, y1], [x1, y0]],
                      "x": x0, "y": y0, "width": round(x1 - x0, _PIXELS),
                      "height": round(y1 - y0, _PIXELS), "score": round(p.score, 4)})
    task = {"image": image, "width": width, "height": height, "spans": spans,
            "meta": {"score": score, "model_version": model_version, **(meta or {})}}
    if path is not None:
        task["path"] = path
    return task


def labelstudio_task(image: str, width: int, height: int, proposals: Iterable[Proposal],
                     model_version: str, score: float, *, from_name: str = "label",
                     to_name: str = "image", meta: dict | None = None) -> dict:
    """One import task with the proposals as a prediction. `from_name`/`to_name` are the
    RectangleLabels and Image tag names of the project's labeling config (whose Image tag
    reads `$image`); `meta` items become `odapi_<name>` data columns."""
    result = []
    for index, p in enumerate(proposals):
        result.append({
            "id": f"p{index}", "type": "rectanglelabels", "from_name": from_name,
            "to_name": to_name, "original_width": width, "original_height": height,
            "image_rotation": 0, "score": round(p.score, 4),
            "value": {"x": round(100 * p.xmin, _PERCENT), "y": round(100 * p.ymin, _PERCENT),
                      "width": round(100 * (p.xmax - p.xmin), _PERCENT),
                      "height": round(100 * (p.ymax - p.ymin), _PERCENT),
                      "rotation": 0, "rectanglelabels": [p.label]}})
    extra = {f"odapi_{name}": value for name, value in (meta or {}).items()}
    return {"data": {"image": image, **extra},  # extra columns for the Data Manager
            "predictions": [{"model_version": model_version, "score": score,
                             "result": result}]}


def write_tasks(folder: str | Path, fmt: str, tasks: list[dict]) -> str:
    """Write `tasks` as the format's import file in `folder`; return its path."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} not one of {FORMATS}")
    path = Path(folder) / TASK_FILES[fmt]
    if fmt == "prodigy":
        text = "".join(json.dumps(task, sort_keys=True) + "\n" for task in tasks)
    else:
        text = json.dumps(tasks, indent=1, sort_keys=True)
    storage.write_text(path, text)
    return str(path)
