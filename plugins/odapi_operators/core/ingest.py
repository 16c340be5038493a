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

from odapi_operators.core import storage
from odapi_operators.core.formats.voc import parse_voc
from odapi_operators.core.manifest import ImageRecord, write_manifest
from odapi_operators.core.report import RecordError, RejectionLog, StageError

FORMATS = ("auto", "voc")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
MARKER_NAMES = {"_SUCCESS", ".done"}


def _collect_files(inputs: list[str]) -> list[tuple[str, str]]:
    """(export root, file) for every file of every input (a folder, or a single file)."""
    files: list[tuple[str, str]] = []
    for item in inputs:
        if not storage.exists(item):
            raise StageError(f"{item}: export not found")
        root = item if Path(item).is_dir() else str(Path(item).parent)
        files.extend((root, path) for path in storage.list_files(item))
    return files


def _annotation_files(files: list[tuple[str, str]],
                      fmt: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Split files into annotation files for `fmt` and files that are neither those nor images."""
    annotations, other = [], []
    for root, path in files:
        suffix = Path(path).suffix.lower()
        if suffix == ".xml" and fmt in ("auto", "voc"):
            annotations.append((root, path))
        elif suffix not in IMAGE_SUFFIXES and Path(path).name not in MARKER_NAMES:
            other.append(path)
    return annotations, other


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
           fmt: str = "auto") -> dict:
    """Parse `inputs` (files or export folders) into `out_dir`; return the summary."""
    if fmt not in FORMATS:
        raise StageError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not inputs:
        raise StageError("no annotation exports given")
    files = _collect_files(inputs)
    annotations, other = _annotation_files(files, fmt)
    if not annotations:
        raise StageError(f"{', '.join(inputs)}: no annotation files found "
                         f"({len(files)} files; looked for Pascal VOC *.xml)")
    log = RejectionLog()
    records = _merge(parse_voc(annotations, images_root, log), log)
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
