"""Ingest stage: annotation exports -> canonical manifest + rejection report.

Reads every export given, parses it with the matching format parser, merges records by image
key and writes `manifest.jsonl`, `rejections.jsonl` and `summary.json` to the stage folder in
one atomic step. Bad files and boxes are reported and skipped; only an export with nothing
usable fails the stage.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from odapi_operators.core import formats, storage
from odapi_operators.core.manifest import ImageRecord, write_manifest
from odapi_operators.core.report import RecordError, RejectionLog, StageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
MARKER_NAMES = {"_SUCCESS", ".done"}
SNIFF_BYTES = 4096


def _classify(root: Path, fmt: str) -> tuple[dict[str, list[Path]], list[str], int]:
    """Files of one export grouped by format, plus unclaimed non-image files and a file count."""
    files = [Path(p) for p in storage.list_files(root)]
    claimed: dict[str, list[Path]] = {}
    other: list[str] = []
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES or path.name in MARKER_NAMES:
            continue
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
        if fmt == "auto":
            name = formats.detect(path, head)
        else:
            module = formats.load(fmt)
            name = fmt if path.suffix.lower() in module.SUFFIXES else None
        if name:
            claimed.setdefault(name, []).append(path)
        else:
            other.append(str(path))
    return claimed, other, len(files)


def _parse_exports(inputs: list[str], fmt: str, images_root: str | None, log: RejectionLog,
                   inline_dir: Path, options: dict) -> tuple[list[ImageRecord], list[str]]:
    records: list[ImageRecord] = []
    ignored: list[str] = []
    for item in inputs:
        path = Path(item)
        if not storage.exists(item):
            raise StageError(f"{item}: export not found")
        root = path if path.is_dir() else path.parent
        claimed, other, count = _classify(path, fmt)
        ignored.extend(other)
        if not claimed:
            raise StageError(f"{item}: no annotation files found ({count} files; "
                             f"formats tried: {fmt if fmt != 'auto' else ', '.join(formats.AVAILABLE)})")
        ctx = formats.ParseContext(export_root=root,
                                   images_root=Path(images_root) if images_root else None,
                                   log=log, inline_dir=inline_dir, options=options)
        for name, files in sorted(claimed.items()):
            records.extend(formats.load(name).parse(sorted(files), ctx))
    return records, ignored


def _merge(records, log: RejectionLog) -> list[ImageRecord]:
    merged: dict[str, ImageRecord] = {}
    for record in records:
        if not os.path.isfile(record.source.uri):
            log.add(RecordError(record.provenance.get("file", "?"), record.source_id,
                                f"missing image: {record.source.uri}").rejection)
            continue
        first = merged.get(record.key)
        if first is None:
            merged[record.key] = record
            continue
        same = first.boxes == record.boxes
        reason = "duplicate record" if same else "conflicting duplicate"
        log.add(RecordError(record.provenance.get("file", "?"), record.source_id,
                            f"{reason}: image key {record.key} already given by "
                            f"{first.provenance.get('file')}").rejection)
    return [merged[key] for key in sorted(merged)]


def fingerprint(records: list[ImageRecord]) -> str:
    """Content fingerprint of a dataset version: same records in, same fingerprint out."""
    digest = hashlib.sha256()
    for record in records:
        content = {"key": record.key, "boxes": [list(b.__dict__.values()) for b in record.boxes],
                   "size": [record.width, record.height], "source": record.source.uri}
        digest.update(json.dumps(content, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def ingest(inputs: list[str], out_dir: str | Path, images_root: str | None = None,
           fmt: str = "auto", options: dict | None = None) -> dict:
    """Parse `inputs` (files or export folders) into `out_dir`; return the summary.

    Images embedded in an export are written, by content hash, to `<out_dir>-inline/`.
    """
    if fmt != "auto":
        try:
            formats.load(fmt)
        except ValueError as exc:
            raise StageError(str(exc)) from None
    if not inputs:
        raise StageError("no annotation exports given")
    log = RejectionLog()
    inline_dir = Path(out_dir).with_name(Path(out_dir).name + "-inline")
    parsed, other = _parse_exports(inputs, fmt, images_root, log, inline_dir, options or {})
    records = _merge(parsed, log)
    classes = Counter(box.label for record in records for box in record.boxes)
    summary = {
        "inputs": list(inputs),
        "images": len(records),
        "boxes": sum(classes.values()),
        "classes": dict(sorted(classes.items())),
        "rejected": len(log),
        "rejections_by_reason": log.by_reason(),
        "ignored_files": other,
        "fingerprint": fingerprint(records),
    }
    with storage.atomic_directory(out_dir) as tmp:
        write_manifest(tmp / "manifest.jsonl", records)
        log.write(tmp / "rejections.jsonl")
        summary_with_paths = {**summary, "manifest": str(Path(out_dir) / "manifest.jsonl"),
                              "rejections": str(Path(out_dir) / "rejections.jsonl")}
        storage.write_text(tmp / "summary.json", json.dumps(summary_with_paths, indent=2))
    if not records:
        first = "; ".join(str(r) for r in log.items[:3])
        raise StageError(f"no usable records in {', '.join(inputs)}: {len(log)} rejected "
                         f"(e.g. {first}); see {summary_with_paths['rejections']}")
    return summary_with_paths
