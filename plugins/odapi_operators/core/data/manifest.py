"""The canonical manifest: one JSON line per image, whatever export format it came from.

Every parser yields `ImageRecord`s; every later stage reads and writes them. Boxes are
normalized to 0..1 so a record does not depend on how an image is later resized.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from odapi_operators.core import storage

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def key_from_path(relative_path: str) -> str:
    """Stable image key from an image path relative to its export (or images) root."""
    name = relative_path.replace("\\", "/")
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    return _KEY_UNSAFE.sub("_", stem.replace("/", "__")).strip("_")


def key_from_url(url: str) -> str:
    """Stable key for a remote image: its file stem plus a short hash of the full URL."""
    stem = key_from_path(url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]) or "image"
    return f"{stem[:64]}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def key_from_id(source_id: str) -> str:
    """Stable key from a source's own image id (e.g. an Open Images ImageID)."""
    return _KEY_UNSAFE.sub("_", source_id).strip("_")


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
        return replace(self, source=source, **changes)

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
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageRecord":
        return cls(
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
