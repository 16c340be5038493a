"""The canonical manifest: one JSON line per image, whatever export format it came from.

Every parser yields `ImageRecord`s; every later stage reads and writes them. Boxes are
normalized to 0..1 so a record does not depend on how an image is later resized.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from odapi_operators.core import storage


@dataclass(frozen=True)
class Box:
    label: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float


@dataclass(frozen=True)
class ImageSource:
    """Where the image bytes come from: kind is `local`, `url`, `gs` or `inline`."""

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

    def with_source(self, source: ImageSource, **changes: Any) -> "ImageRecord":
        return replace(self, source=source, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

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
