"""Prodigy `db-out` JSONL from image recipes: one annotated task a line.

Only accepted tasks are labels (`reject`/`ignore` are reported). `spans` are boxes or polygons
in original-image pixels: a span's box is the min/max over its `points`, else its `x, y, width,
height`. A task whose spans were all refused is dropped; one without spans is a negative. The file is streamed line by line, so a multi-gigabyte export (images inlined as
base64) never sits in memory; a malformed line, a truncated last one included, is reported by
its line number and the rest keep flowing.

An inline image (`data:image/...;base64,...`) is decoded, checked to be an image by its magic
bytes and written once to `ctx.inline_dir/<sha256>.<ext>`: the manifest references that file,
never the base64 text. With `--remove-base64` the recipe leaves a path (`image` or `path`): an
annotator's absolute path is looked up by file name inside the images root, like labelImg's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from odapi_operators.core import storage
from odapi_operators.core.data.boxes import normalized_box
from odapi_operators.core.data.formats.common import (
    brief,
    image_size,
    is_number,
    kept,
    load_json,
    no_usable_box,
    scalar,
)
from odapi_operators.core.data.manifest import Box, ImageRecord, ImageSource
from odapi_operators.core.rejections import RecordError

if TYPE_CHECKING:
    from odapi_operators.core.data.formats import ParseContext

NAME = "prodigy"
SUFFIXES = (".jsonl", ".ndjson")

_ABSOLUTE = re.compile(r"^(/|[A-Za-z]:[\\/]|\\\\)")  # POSIX, Windows drive or UNC path
_DATA_URI = re.compile(r"^data:([^,]*?);base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")
_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


def sniff(path: Path, head: bytes) -> bool:
    """JSON lines of image tasks: judged by the first task, or by the head when that task
    (an inline image) is longer than the head or unreadable."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] != b"{":
        return False
    first, newline, _ = text.partition(b"\n")
    if newline:
        try:
            task = json.loads(first)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to judge
            task = None
        if isinstance(task, dict):
            return "image" in task
    return b'"image"' in text


def image_kind(data: bytes) -> str | None:
    """File extension for JPEG/PNG/GIF/WebP/BMP bytes, else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), None)


def _decode_data_uri(uri: str) -> tuple[bytes, str]:
    """(bytes, extension) of a base64 image data URI; raises ValueError."""
    header = _DATA_URI.match(uri)
    if header is None:
        raise ValueError(f"bad data URI: not base64 ({uri[:40]}...)")
    payload = _WHITESPACE.sub(b"", uri[header.end():].encode("ascii", "replace"))
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"bad data URI: invalid base64 ({exc})") from None
    ext = image_kind(data)
    if ext is None:
        raise ValueError(f"not an image: data URI ({header.group(1) or 'no type'}) holds "
                         f"{len(data)} bytes that are not JPEG/PNG/GIF/WebP/BMP")
    return data, ext


def _points_extent(span: dict) -> tuple[float, float, float, float]:
    points = span["points"]
    if (not isinstance(points, list) or len(points) < 2
            or not all(isinstance(p, list) and len(p) == 2 and all(is_number(c) for c in p)
                       for p in points)):
        raise ValueError("bad span: points must be [[x, y], ...] numbers (at least 2)")
    coords = [c for p in points for c in p]
    if not all(math.isfinite(c) for c in coords):  # min/max would quietly drop a NaN
        return (math.nan,) * 4
    xs, ys = coords[0::2], coords[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def _span_box(span: Any, size: tuple[int, int] | None) -> Box:
    """A span in original pixels -> checked normalized box; raises ValueError."""
    if not isinstance(span, dict):
        raise ValueError("bad span: not a JSON object")
    label = span.get("label")
    if not isinstance(label, str):
        raise ValueError(f"bad span: label is {brief(label)}")
    if span.get("points") is not None:
        extent = _points_extent(span)
    else:
        rect = [span.get(k) for k in ("x", "y", "width", "height")]
        if not all(is_number(c) for c in rect):
            raise ValueError(f"bad span: no points and x/y/width/height are {brief(rect)}")
        x, y, w, h = rect
        extent = (x, y, x + w, y + h)
    if size is None:
        raise ValueError("missing image size: task has no width/height to place a pixel "
                         "span (task left out)")
    return normalized_box(label, *extent, *size)


def _reference(task: dict) -> str | None:
    """The image reference: `image`, or `path` when the recipe removed the base64."""
    for field in ("image", "path"):
        if isinstance(task.get(field), str) and task[field].strip():
            return task[field].strip()
    return None


def _task_record(task: Any, number: int, file: str, folder: Path,
                 ctx: ParseContext) -> ImageRecord:
    record = f"line {number}"
    if not isinstance(task, dict):
        raise RecordError(file, record, "malformed line: not a JSON object")
    answer = task.get("answer")
    if answer != "accept":
        shown = answer if isinstance(answer, str) else brief(answer)
        raise RecordError(file, record, f"not accepted: {shown if answer else 'no answer'}")
    reference = _reference(task)
    hashes = [task.get(k) for k in ("_task_hash", "_input_hash") if task.get(k) is not None]
    inline = None
    if reference and reference[:5].lower() == "data:":
        if ctx.inline_dir is None:
            raise RecordError(file, record, "unsupported image location: inline image but no "
                                            "inline folder to write it to")
        try:
            inline = _decode_data_uri(reference)
        except ValueError as exc:
            raise RecordError(file, record, str(exc)) from None
        digest = hashlib.sha256(inline[0]).hexdigest()
        target = Path(ctx.inline_dir) / f"{digest}.{inline[1]}"
        key, source = f"inline-{digest[:16]}", ImageSource("local", str(target))
        path = task.get("path") if isinstance(task.get("path"), str) else None
        source_id = str(scalar(hashes[0])) if hashes else (path or key)
    else:
        name = reference
        if name and _ABSOLUTE.match(name) and "://" not in name:
            name = re.split(r"[\\/]", name)[-1]  # the annotator's machine: look up by name
        key, source = ctx.locate(name, folder, file, record)
        source_id = str(scalar(hashes[0])) if hashes else reference

    try:
        size = image_size(task.get("width"), task.get("height"))
    except ValueError as exc:
        raise RecordError(file, record, str(exc)) from None
    spans = task.get("spans") or []
    if not isinstance(spans, list):
        raise RecordError(file, record, f"bad span: spans is {type(spans).__name__}, not a list")
    boxes: list[Box] = []
    for index, span in enumerate(spans):
        try:
            boxes.append(_span_box(span, size))
        except ValueError as exc:
            ctx.log.add(RecordError(file, f"{record} span[{index}]", str(exc)).rejection)
    if spans and not boxes:  # keeping it would teach the model its objects are background
        raise no_usable_box(file, record, len(spans), "spans")

    if inline and not Path(source.uri).exists():
        storage.write_bytes(source.uri, inline[0])
    provenance: dict[str, Any] = {"format": NAME, "file": file, "line": number}
    meta = task.get("meta")
    if isinstance(meta, dict) and meta.get("model_version") is not None:
        provenance["model_version"] = scalar(meta["model_version"])
    width, height = size or (None, None)
    return ImageRecord(key=key, source=source, source_id=source_id, width=width, height=height,
                       boxes=tuple(boxes), provenance=provenance)


def parse_prodigy_file(path: Path, ctx: ParseContext) -> Iterator[ImageRecord]:
    file = str(path)
    folder = Path(path).parent
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            record = kept(ctx.log, lambda: _task_record(_line_task(raw, number, file), number,
                                                        file, folder, ctx))
            if record is not None:
                yield record


def _line_task(raw: bytes, number: int, file: str) -> Any:
    try:
        return load_json(raw, file, f"line {number}")
    except RecordError as exc:
        ending = "" if raw.endswith(b"\n") else " (truncated last line?)"
        reason = exc.rejection.reason.removeprefix("not valid JSON: ")
        raise RecordError(file, f"line {number}", f"malformed line: {reason}{ending}") from None


def parse(files: list[Path], ctx: ParseContext) -> Iterator[ImageRecord]:
    """Stream the Prodigy JSONL files of one export; an unreadable file is reported."""
    from odapi_operators.core.data.formats import parse_each

    return parse_each(files, ctx, parse_prodigy_file)