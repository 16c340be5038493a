"""The canonical manifest: one JSON line per image, whatever export format it came from.

Every parser yields `ImageRecord`s; every later stage reads and writes them. Boxes are
normalized to 0..1 so a record does not depend on how an image is later resized.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, Iterable, Iterator

from odapi_operators.core import storage
from odapi_operators.core.external_sort import ExternalSorter, Spool

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# A path part that flattens reversibly: safe characters, no "__", no "_" at either end.
_PLAIN_PART = re.compile(r"[A-Za-z0-9.-]+(?:_[A-Za-z0-9.-]+)*")
# json.dumps(..., sort_keys=True), the encoder made once: manifests, journals and cache keys
# write a line per image with it
sorted_json = json.JSONEncoder(sort_keys=True).encode
# A key names files (`files/<key>.jpeg` and its `.tmp-<name>-<host>-<pid>-<8 hex>` sibling, 255 bytes at most).
MAX_KEY_LENGTH = 220


def _distinct(flat: str, original: str, plain: bool) -> str:
    """`flat` itself when flattening lost nothing, else `flat` plus a short hash of `original`:
    distinct names keep distinct keys, and plain names keep the keys they always had."""
    if plain and flat and len(flat) <= MAX_KEY_LENGTH:
        return flat
    digest = hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{flat[:MAX_KEY_LENGTH] or 'image'}-{digest}"


def key_from_path(relative_path: str) -> str:
    """Stable image key from an image path relative to its export (or images) root.

    Folders join with "__" and unsafe characters become "_" (`day/0001.jpg` -> `day__0001`).
    Where that could give two paths one key (`x/y.jpg` and `x__y.jpg`, `a b.jpg` and
    `a_b.jpg`) or a key too long for a file name, a hash of the path is appended. The
    extension is not part of the key: `a.jpg` and `a.png` name one image in two encodings.
    """
    stem = _stem(relative_path)
    plain = "\\" not in relative_path and all(_PLAIN_PART.fullmatch(p) for p in stem.split("/"))
    return _distinct(_flatten(stem), relative_path, plain)


def _stem(relative_path: str) -> str:
    name = relative_path.replace("\\", "/")
    return name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name


def _flatten(stem: str) -> str:
    return _KEY_UNSAFE.sub("_", stem.replace("/", "__")).strip("_")


def key_from_url(url: str) -> str:
    """Stable key for a remote image: its file stem plus a short hash of the full URL."""
    stem = _flatten(_stem(url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])) or "image"
    return f"{stem[:64]}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def key_from_id(source_id: str) -> str:
    """Stable key from a source's own image id (e.g. an Open Images ImageID); an id that is
    not already a safe file name gets a hash, so two ids never share a key."""
    flat = _KEY_UNSAFE.sub("_", source_id).strip("_")
    return _distinct(flat, source_id, flat == source_id)


@dataclass(frozen=True)
class Box:
    label: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float


@dataclass(frozen=True)
class ImageSource:
    """Where the image bytes come from: kind is `local`, `url` or `gs`.

    Inline images (base64 in an export) are decoded to files at ingest and become `local`.
    """

    kind: str
    uri: str


@dataclass(frozen=True)
class ImageRecord:
    key: str
    source: ImageSource
    source_id: str
    width: int | None
    height: int | None
    boxes: tuple[Box, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    md5: str | None = None  # expected checksum of the image bytes (hex), when the source gives one
    rotation: int = 0       # clockwise degrees the source says image AND boxes must be rotated

    def with_source(self, source: ImageSource, **changes: Any) -> "ImageRecord":
        """This record from another source (and with `changes`); `dataclasses.replace`
        without its per-field checks, as every stage does this once per image."""
        return ImageRecord(**{**self.__dict__, "source": source, **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (written by hand: `dataclasses.asdict` deep-copies, 4x slower)."""
        return {
            "key": self.key,
            "source": {"kind": self.source.kind, "uri": self.source.uri},
            "source_id": self.source_id,
            "width": self.width,
            "height": self.height,
            "boxes": [{"label": b.label, "xmin": b.xmin, "ymin": b.ymin, "xmax": b.xmax,
                       "ymax": b.ymax} for b in self.boxes],
            "provenance": self.provenance,
            "md5": self.md5,
            "rotation": self.rotation,
        }

    def to_json(self) -> str:
        return sorted_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageRecord":
        source, boxes = data["source"], data.get("boxes", ())
        if source.keys() == _SOURCE_FIELDS and all(b.keys() == _BOX_FIELDS for b in boxes):
            return _built(cls, {  # fields in their declared order, as `__init__` sets them
                "key": data["key"],
                "source": _built(ImageSource, {"kind": source["kind"], "uri": source["uri"]}),
                "source_id": data["source_id"], "width": data.get("width"),
                "height": data.get("height"),
                "boxes": tuple(_built(Box, {"label": b["label"], "xmin": b["xmin"],
                                            "ymin": b["ymin"], "xmax": b["xmax"],
                                            "ymax": b["ymax"]}) for b in boxes),
                "provenance": data.get("provenance", {}), "md5": data.get("md5"),
                "rotation": data.get("rotation", 0)})
        return cls(  # unexpected fields: let the constructors name them
            key=data["key"],
            source=ImageSource(**data["source"]),
            source_id=data["source_id"],
            width=data.get("width"),
            height=data.get("height"),
            boxes=tuple(Box(**b) for b in data.get("boxes", ())),
            provenance=data.get("provenance", {}),
            md5=data.get("md5"),
            rotation=data.get("rotation", 0),
        )

    def to_row(self) -> tuple:
        """Plain tuple of this record, what `external_sort` pickles (~3x faster than the
        dataclasses themselves); `from_row` gives it back."""
        return (self.key, self.source.kind, self.source.uri, self.source_id, self.width,
                self.height, [(b.label, b.xmin, b.ymin, b.xmax, b.ymax) for b in self.boxes],
                self.provenance, self.md5, self.rotation)

    @classmethod
    def from_row(cls, row: tuple) -> "ImageRecord":
        key, kind, uri, source_id, width, height, boxes, provenance, md5, rotation = row
        return cls(key, ImageSource(kind, uri), source_id, width, height,
                   tuple(Box(*b) for b in boxes), provenance, md5, rotation)


_SOURCE_FIELDS = frozenset(("kind", "uri"))
_BOX_FIELDS = frozenset(("label", "xmin", "ymin", "xmax", "ymax"))


def _built(cls: type, fields: dict[str, Any]) -> Any:
    """An instance of the frozen dataclass `cls` from all of its fields, without the checked
    per-field `__setattr__` of a frozen `__init__`: every stage reads every record of its
    manifest, and this makes reading one about twice as fast."""
    built = object.__new__(cls)
    built.__dict__.update(fields)
    return built


def _weight(record: ImageRecord) -> int:
    """About the bytes a record holds in memory (measured with tracemalloc)."""
    return 300 + 250 * len(record.boxes)


def records_by_key() -> ExternalSorter[ImageRecord]:
    """An external sort of records by image key (stable: the first given comes out first),
    bounded in boxes held in memory."""
    return ExternalSorter(key=attrgetter("key"), encode=ImageRecord.to_row,
                          decode=ImageRecord.from_row, weight=_weight)


def record_spool() -> Spool[ImageRecord]:
    """Records kept in order for reading again, bounded in boxes held in memory."""
    return Spool(encode=ImageRecord.to_row, decode=ImageRecord.from_row, weight=_weight)


def write_manifest(path: str | Path, records: Iterable[ImageRecord]) -> int:
    """Write records as JSON lines, atomically; return how many were written."""
    count = 0
    with storage.atomic_write(path, "w") as fh:
        for record in records:
            fh.write(record.to_json() + "\n")
            count += 1
    return count


def read_manifest(path: str | Path) -> Iterator[ImageRecord]:
    """Stream records from a manifest written by `write_manifest`."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield ImageRecord.from_dict(json.loads(line))


class Manifest:
    """A manifest file as records, read from the file again each time it is iterated."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __iter__(self) -> Iterator[ImageRecord]:
        return read_manifest(self.path)


def count_records(path: str | Path) -> int:
    """How many records a manifest holds, without parsing them (a progress total)."""
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())
