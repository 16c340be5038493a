"""Records straight from an Open Images image index CSV, for `odapi download --index`.

Columns are found by name: `ImageID` and `OriginalURL` are required; `OriginalMD5` (base64)
and `Rotation` (counterclockwise degrees) are used when present, converted exactly as the
Open Images parser does. The file is streamed, never loaded whole.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from odapi_operators.core.data.formats.openimages import md5_hex, rotation_clockwise
from odapi_operators.core.data.manifest import ImageRecord, ImageSource, key_from_id
from odapi_operators.core.rejections import RecordError, RejectionLog

REQUIRED = ("ImageID", "OriginalURL")


def _kind(url: str) -> str | None:
    lower = url.lower()
    if lower.startswith(("http://", "https://")):
        return "url"
    return "gs" if lower.startswith("gs://") else None


def read_image_index(path: str | Path, log: RejectionLog) -> Iterator[ImageRecord]:
    """One record per valid row; a bad row becomes a rejection (file, line, reason)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: not an Open Images image index: no column "
                             f"{', '.join(missing)} in header {reader.fieldnames}")
        for number, row in enumerate(reader, start=2):
            image_id = (row.get("ImageID") or "").strip()
            url = (row.get("OriginalURL") or "").strip()
            try:
                if not image_id:
                    raise ValueError("missing value: no ImageID")
                kind = _kind(url)
                if kind is None:
                    raise ValueError(f"invalid URL: OriginalURL {url!r} is not http(s):// or gs://")
                md5 = md5_hex(row.get("OriginalMD5") or "")
                rotation = rotation_clockwise(row.get("Rotation") or "")
            except ValueError as exc:
                log.add(RecordError(str(path), f"line {number}", str(exc)).rejection)
                continue
            yield ImageRecord(key=key_from_id(image_id), source=ImageSource(kind, url),
                              source_id=image_id, width=None, height=None, boxes=(),
                              provenance={"format": "openimages-index", "file": str(path),
                                          "line": number},
                              md5=md5, rotation=rotation)
