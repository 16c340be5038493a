"""TF Object Detection API TFRecords (+ label_map.pbtxt): what users of the OD API bring along.

Each record is a `tf.train.Example` with the OD API keys (`image/encoded`, `image/height`,
`image/width`, `image/filename`, `image/source_id`, `image/object/bbox/{xmin,xmax,ymin,ymax}`
normalized 0..1, `image/object/class/text`, `image/object/class/label`,
`image/object/is_crowd`), read without TensorFlow (`data/tfrecord.py`). Files are named
`*.tfrecord`, `*.record`, `*.tfrecords`, or sharded `train.record-00000-of-00010`; GZIP ones
are read too.

Images are included: each record's encoded image is written once, by content hash, to
`ctx.inline_dir/<sha256>.<ext>` (like Prodigy's inline images) and the record's key is
`tfrecord-<first 16 hex of that hash>`, so fetch and verify find it and the same image twice
is a duplicate. Boxes stay the stored normalized float32 values, exactly.

Class names: with a `label_map.pbtxt` (beside the records, or above them, or the export's only
one), `class/label` ids map through it (what the OD API trained on), and a `class/text` that
disagrees is reported; without one, `class/text` names the class. Crowd boxes (`is_crowd`) are reported and skipped, as in COCO.
A record that breaks (bad checksum, not an Example, no image) is rejected as `record N` (1-based)
and the next one is read; a broken length field ends the file, reported with its byte offset.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

from odapi_operators.core import storage
from odapi_operators.core.data.boxes import checked_box, checked_size
from odapi_operators.core.data.content import EXTENSIONS, sniff_format
from odapi_operators.core.data.formats.common import brief, no_usable_box
from odapi_operators.core.data.label_map import LabelMapError, parse_label_map
from odapi_operators.core.data.manifest import Box, ImageRecord, ImageSource
from odapi_operators.core.data.tfrecord import (
    RecordFramingError,
    decode_example,
    is_record_head,
    read_records,
)
from odapi_operators.core.rejections import RecordError

if TYPE_CHECKING:
    from odapi_operators.core.data.formats import ParseContext

NAME = "tfrecord"
SUFFIXES = (".tfrecord", ".tfrecords", ".record", ".pbtxt", ".gz")
# Sharded names end in "-00000-of-00010", which is not a suffix Path.suffix can see.
NAME_PATTERN = re.compile(r"\.(tfrecords?|record)(-\d+-of-\d+)?(\.gz)?$", re.IGNORECASE)
GZIP_MAGIC = b"\x1f\x8b"
COORDS = ("xmin", "ymin", "xmax", "ymax")


def is_records_name(path: Path) -> bool:
    return bool(NAME_PATTERN.search(path.name))


def sniff(path: Path, head: bytes) -> bool:
    """A TFRecord whose first length checksum holds (or a GZIP file named like one); a label
    map only next to TFRecords, so a label_map.pbtxt in another export stays unclaimed."""
    if path.suffix.lower() == ".pbtxt":
        return b"item" in head and any(is_records_name(p) for p in path.parent.iterdir())
    if head.startswith(GZIP_MAGIC):
        return is_records_name(path)
    return is_record_head(head)


def _open(path: Path) -> BinaryIO:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def _text(values: list, key: str) -> str | None:
    if not values:
        return None
    try:
        return values[0].decode("utf-8").strip() or None
    except UnicodeDecodeError:
        raise ValueError(f"bad {key}: not UTF-8 text") from None


class _Classes:
    """Class names of the boxes: label map ids first, `class/text` otherwise."""

    def __init__(self, label_map: dict[int, str] | None, label_map_file: str | None):
        self.by_id, self.file = label_map, label_map_file

    def name(self, labels: list[int], texts: list[bytes], index: int) -> str:
        text = None
        if index < len(texts):
            try:
                text = texts[index].decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("bad image/object/class/text: not UTF-8 text") from None
        if self.by_id is None or index >= len(labels):
            if text is not None:
                return text
            if index >= len(labels):
                raise ValueError("no class name: neither image/object/class/text nor "
                                 "image/object/class/label for this box")
            raise ValueError("no class name: no image/object/class/text and no "
                             f"label_map.pbtxt to name image/object/class/label {labels[index]}")
        name = self.by_id.get(labels[index])
        if name is None:
            raise ValueError(f"unknown class id: image/object/class/label {labels[index]} is "
                             f"not in {self.file}")
        if text is not None and text != name:
            raise ValueError(f"class mismatch: image/object/class/text {text!r} but label "
                             f"{labels[index]} is {name!r} in {self.file}")
        return name


def _boxes(features: dict[str, list], classes: _Classes, file: str, record: str,
           ctx: ParseContext) -> tuple[Box, ...]:
    coords = [features.get(f"image/object/bbox/{c}", []) for c in COORDS]
    count = len(coords[0])
    if any(len(c) != count for c in coords):
        raise RecordError(file, record, "bad boxes: image/object/bbox/xmin, ymin, xmax, ymax "
                                        f"have {', '.join(str(len(c)) for c in coords)} values")
    labels = features.get("image/object/class/label", [])
    texts = features.get("image/object/class/text", [])
    crowd = features.get("image/object/is_crowd", [])
    boxes = []
    for index in range(count):
        where = f"{record} object[{index}]"
        try:
            if index < len(crowd) and crowd[index]:
                raise ValueError("crowd box: image/object/is_crowd=1 regions are not single "
                                 "objects")
            boxes.append(checked_box(classes.name(labels, texts, index),
                                     *(c[index] for c in coords)))
        except ValueError as exc:
            ctx.log.add(RecordError(file, where, str(exc)).rejection)
    if count and not boxes:  # keeping it would teach the model its objects are background
        raise no_usable_box(file, record, count, "boxes")
    return tuple(boxes)


def _size(features: dict[str, list], file: str, record: str) -> tuple[int | None, int | None]:
    width, height = features.get("image/width", []), features.get("image/height", [])
    if not width and not height:
        return None, None
    try:
        return checked_size(width[0] if width else 0, height[0] if height else 0)
    except ValueError as exc:
        raise RecordError(file, record, f"{exc} (image/width, image/height)") from None


def _record(data: bytes | None, number: int, offset: int, file: str, classes: _Classes,
            ctx: ParseContext) -> ImageRecord:
    record = f"record {number}"
    if data is None:
        raise RecordError(file, record, f"corrupt record: data checksum mismatch (byte {offset})")
    try:
        features = decode_example(data)
    except ValueError as exc:
        raise RecordError(file, record, f"not a tf.train.Example: {exc}") from None
    encoded = features.get("image/encoded", [])
    if not encoded or not isinstance(encoded[0], bytes):
        raise RecordError(file, record, "no image: the Example has no image/encoded bytes "
                                        "(images are part of an OD API TFRecord)")
    kind = sniff_format(encoded[0][:16])
    if kind is None:
        raise RecordError(file, record, "not an image: image/encoded starts with "
                                        f"{brief(encoded[0][:8])}")
    try:
        filename = _text(features.get("image/filename", []), "image/filename")
        source_id = _text(features.get("image/source_id", []), "image/source_id")
    except ValueError as exc:
        raise RecordError(file, record, str(exc)) from None
    width, height = _size(features, file, record)
    boxes = _boxes(features, classes, file, record, ctx)
    if ctx.inline_dir is None:
        raise RecordError(file, record, "unsupported image location: embedded image but no "
                                        "inline folder to write it to")
    digest = hashlib.sha256(encoded[0]).hexdigest()
    target = Path(ctx.inline_dir) / f"{digest}{EXTENSIONS[kind]}"
    if not target.exists():
        storage.write_bytes(target, encoded[0])
    provenance = {"format": NAME, "file": file, "record": number}
    if source_id is not None:
        provenance["source_id"] = source_id
    return ImageRecord(key=f"tfrecord-{digest[:16]}", source=ImageSource("local", str(target)),
                       source_id=filename or source_id or f"{Path(file).name}:{record}",
                       width=width, height=height, boxes=boxes, provenance=provenance)


def parse_records_file(path: Path, classes: _Classes,
                       ctx: ParseContext) -> Iterator[ImageRecord]:
    file, number = str(path), 0
    with _open(path) as stream:
        try:
            for number, (offset, data) in enumerate(read_records(stream), 1):
                try:
                    yield _record(data, number, offset, file, classes, ctx)
                except RecordError as exc:
                    ctx.log.add(exc.rejection)
        except RecordFramingError as exc:
            ctx.log.add(RecordError(file, f"record {number + 1}",
                                    f"{exc}; the rest of the file is not read").rejection)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            ctx.log.add(RecordError(file, f"record {number + 1}",
                                    f"unreadable file: {exc}; the rest of the file is not "
                                    "read").rejection)


def _label_maps(paths: list[Path], ctx: ParseContext) -> dict[Path, _Classes]:
    """The export's good label maps by folder (the first of a folder); bad ones reported."""
    found: dict[Path, _Classes] = {}
    for path in sorted(paths):
        try:
            names = parse_label_map(path.read_text(encoding="utf-8"), str(path))
        except (LabelMapError, UnicodeDecodeError, OSError) as exc:
            ctx.log.add(RecordError(str(path), "document", f"bad label map: {exc}").rejection)
            continue
        found.setdefault(path.parent.resolve(), _Classes(
            {item_id: name for name, item_id in names.items()}, str(path)))
    return found


def _classes_for(records: Path, label_maps: dict[Path, _Classes]) -> _Classes:
    """The label map beside the records (Roboflow writes one per split), else the nearest
    one above them, else the only one of the export; without any, class/text names."""
    for folder in (records.parent.resolve(), *records.parent.resolve().parents):
        if folder in label_maps:
            return label_maps[folder]
    if len(label_maps) == 1:
        return next(iter(label_maps.values()))
    return _Classes(None, None)


def parse(files: list[Path], ctx: ParseContext) -> Iterator[ImageRecord]:
    """Records of every TFRecord file; a label_map.pbtxt names their class ids."""
    from odapi_operators.core.data.formats import parse_each

    paths = [Path(p) for p in files]
    label_maps = _label_maps([p for p in paths if p.suffix.lower() == ".pbtxt"], ctx)
    records = [p for p in paths if p.suffix.lower() != ".pbtxt"]
    return parse_each(records, ctx, lambda path, c: parse_records_file(
        path, _classes_for(path, label_maps), c))
