"""Ingest stage: annotation exports -> canonical manifest + rejection report.

Reads every export given, parses it with the matching format parser (see `formats`), merges
records by image key, applies the unknown-class policy and writes the manifest, label map,
rejections and summary to the stage folder in one atomic step. Bad files and boxes are
reported and skipped; only an export with nothing usable fails the stage.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

from odapi_operators.core import storage
from odapi_operators.core.data import formats
from odapi_operators.core.data.datasets import publish_version
from odapi_operators.core.data.label_map import (
    LabelMapError,
    assert_no_renumbering,
    extend_label_map,
    format_label_map,
    read_label_map,
)
from odapi_operators.core.data.manifest import ImageRecord, write_manifest
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.rejections import RecordError, RejectionLog, StageError

# Rejections that record a choice (an annotator's, COCO's crowd convention, or the config's
# classes / unknown_classes) rather than a defect of the export: the budget does not count them.
CHOICES = frozenset({"not accepted", "cancelled annotation", "superseded annotation",
                     "unlabeled task", "duplicate record", "crowd box", "unknown class",
                     "unknown class skipped", "class not selected", "no selected class"})
BUDGET_SETTING = "exports.max_rejected_share (--max-rejected-share)"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
MARKER_NAMES = {"_SUCCESS", ".done"}
SNIFF_BYTES = 4096


def _leaves_export(path: Path, export: Path) -> bool:
    """True for a file of export folder `export` that resolves (through a symlink) outside it."""
    return export.is_dir() and export.resolve() not in path.resolve().parents


def _format_of(path: Path, head: bytes, fmt: str) -> str | None:
    """The format that reads `path`: the sniffed one (auto), else `fmt` if its names match."""
    if fmt == "auto":
        return formats.detect(path, head)
    return fmt if formats.may_read(formats.load(fmt), path) else None


def _companion_note(name: str, path: Path, head: bytes) -> str | None:
    """Why a file format `name` knows is not read (e.g. Open Images image-level labels), or
    None: such a file is noted, neither parsed nor counted as a rejection."""
    note = getattr(formats.load(name), "companion_note", None)
    return note(path, head) if note else None


class _Files:
    """The files of one export by format, plus what was left unread and why."""

    def __init__(self) -> None:
        self.claimed: dict[str, list[Path]] = {}
        self.other: list[str] = []
        self.skipped: dict[str, str] = {}
        self.count = 0

    def add(self, path: Path, fmt: str) -> bool:
        """File `path` under its format, skipped with a note, or other; True if known."""
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
        name = _format_of(path, head, fmt)
        note = _companion_note(name, path, head) if name else None
        if note:
            self.skipped[str(path)] = note
        elif name:
            self.claimed.setdefault(name, []).append(path)
        else:
            self.other.append(str(path))
        return name is not None


def _classify(root: Path, fmt: str, log: RejectionLog, files: _Files) -> int:
    """Add the files below `root` (a folder or one file) to `files`; how many were known.

    A symlink out of the export folder is refused unread (its first line would otherwise land
    in a rejection reason): an export is what its folder holds.
    """
    paths = [Path(p) for p in storage.list_files(root)]
    files.count += len(paths)
    known = 0
    for path in paths:
        if path.suffix.lower() in IMAGE_SUFFIXES or path.name in MARKER_NAMES:
            continue
        if _leaves_export(path, root):
            log.add(RecordError(str(path), "file", "outside the export: a symlink to a file "
                                                   f"outside {root} (not read)").rejection)
            continue
        known += files.add(path, fmt)
    return known


def _exports(inputs: list[str]) -> list[list[str]]:
    """Inputs grouped into exports: each folder is one, and all the files given one by one
    are one more, in any order (Open Images' boxes CSV, class descriptions and image index
    are one export whether given as a folder or as three files)."""
    exports: list[list[str]] = []
    loose: list[str] = []
    for item in inputs:
        if not storage.exists(item):
            raise StageError(f"{item}: export not found")
        if Path(item).is_dir():
            exports.append([item])
        else:
            if not loose:
                exports.append(loose)
            loose.append(item)
    return exports


def _export_root(items: list[str]) -> Path:
    """A folder export's root is itself; files given one by one share their common folder
    (their own folder when they are in one, as for a single file)."""
    if len(items) == 1 and Path(items[0]).is_dir():
        return Path(items[0])
    return Path(os.path.commonpath([os.path.abspath(Path(i).parent) for i in items]))


def _parse_exports(inputs: list[str], fmt: str, images_root: str | None, log: RejectionLog,
                   inline_dir: Path, options: dict
                   ) -> tuple[list[ImageRecord], list[str], dict[str, str]]:
    records: list[ImageRecord] = []
    ignored: list[str] = []
    skipped: dict[str, str] = {}
    tried = fmt if fmt != "auto" else ", ".join(formats.AVAILABLE)
    for items in _exports(inputs):
        files = _Files()
        for item in items:
            if not _classify(Path(item), fmt, log, files) and not Path(item).is_dir():
                raise StageError(f"{item}: no annotation files found (formats tried: {tried})")
        ignored.extend(files.other)
        skipped.update(files.skipped)
        if not files.claimed:
            raise StageError(f"{', '.join(items)}: no annotation files found ({files.count} "
                             f"files; formats tried: {tried})")
        ctx = formats.ParseContext(export_root=_export_root(items),
                                   images_root=Path(images_root) if images_root else None,
                                   log=log, inline_dir=inline_dir, options=options)
        for name, paths in sorted(files.claimed.items()):
            records.extend(formats.load(name).parse(sorted(paths), ctx))
    return records, ignored, skipped


UNKNOWN_CLASS_POLICIES = ("add", "skip", "reject")


def _merge(records, log: RejectionLog) -> list[ImageRecord]:
    merged: dict[str, ImageRecord] = {}
    for record in records:
        if record.source.kind == "local" and not os.path.isfile(record.source.uri):
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


def apply_class_policy(records: list[ImageRecord], known: dict[str, int] | None, policy: str,
                       log: RejectionLog) -> list[ImageRecord]:
    """Handle classes missing from `known`: add them, skip their boxes, or reject the image.

    Skipping a box leaves an unlabeled object in the image, so it is reported per image.
    """
    if policy not in UNKNOWN_CLASS_POLICIES:
        raise StageError(f"unknown_classes must be one of {UNKNOWN_CLASS_POLICIES}, got {policy!r}")
    if known is None or policy == "add":
        return records
    kept = []
    for record in records:
        unknown = sorted({b.label for b in record.boxes if b.label not in known})
        if not unknown:
            kept.append(record)
            continue
        file = record.provenance.get("file", "?")
        if policy == "reject":
            log.add(RecordError(file, record.source_id, f"unknown class: {', '.join(unknown)} "
                                "(image rejected)").rejection)
            continue
        boxes = tuple(b for b in record.boxes if b.label in known)
        log.add(RecordError(file, record.source_id, f"unknown class skipped: "
                            f"{len(record.boxes) - len(boxes)} boxes of "
                            f"{', '.join(unknown)}").rejection)
        kept.append(replace(record, boxes=boxes))
    return kept


def rejection_budget(log: RejectionLog, kept: int, max_share: float | None) -> dict:
    """The budget's numbers: rejections that count (defects, not `CHOICES`) against all that
    was read (kept images + counted rejections), their share and the limit."""
    counted = sum(r.reason.split(":", 1)[0] not in CHOICES for r in log.items)
    read = kept + counted
    return {"rejected_counted": counted, "read": read,
            "rejected_share": round(counted / read, 4) if read else 0.0,
            "max_rejected_share": max_share}


def check_rejection_budget(budget: dict, report: str) -> None:
    """Raise a DATA StageError when the counted rejections are above the budget: training on
    what is left of such an export would silently skew the data."""
    counted, read, limit = budget["rejected_counted"], budget["read"], budget["max_rejected_share"]
    if limit is not None and read and counted / read > limit:
        raise StageError(f"ingest: {counted} of {read} records rejected ({counted / read:.1%}), "
                         f"above the budget of {limit:.1%} set by {BUDGET_SETTING}; "
                         f"see {report}")


def fingerprint(records: list[ImageRecord], label_map: dict[str, int] | None = None) -> str:
    """Content fingerprint of a dataset version: same records in, same fingerprint out."""
    digest = hashlib.sha256(json.dumps(sorted((label_map or {}).items())).encode())
    for record in records:
        content = {"key": record.key, "boxes": [list(b.__dict__.values()) for b in record.boxes],
                   "size": [record.width, record.height], "source": record.source.uri,
                   "md5": record.md5, "rotation": record.rotation}
        digest.update(json.dumps(content, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def ingest(inputs: list[str], out_dir: str | Path, images_root: str | None = None,
           fmt: str = "auto", options: dict | None = None, label_map: str | None = None,
           unknown_classes: str = "add", datasets_dir: str | None = None,
           production_label_map: str | None = None,
           max_rejected_share: float | None = None) -> dict:
    """Parse `inputs` (files or export folders) into `out_dir`; return the summary.

    Writes `manifest.jsonl`, `label_map.pbtxt` (the given `label_map` extended append-only
    when `unknown_classes` is "add"), `rejections.jsonl` and `summary.json` atomically.
    Images embedded in an export are written, by content hash, to `<out_dir>-inline/`.
    With `datasets_dir`, the result is also published as an immutable dataset version. A
    `label_map` that renumbers `production_label_map`'s classes is refused. More rejections
    than `max_rejected_share` of what was read fail the stage (outputs written, no version
    published); None checks no budget (the stage passes `exports.max_rejected_share`).
    """
    if fmt != "auto":
        try:
            formats.load(fmt)
        except ValueError as exc:
            raise StageError(str(exc)) from None
    if not inputs:
        raise StageError("no annotation exports given")
    known = read_label_map(label_map) if label_map and storage.exists(label_map) else None
    if known is not None and production_label_map and storage.exists(production_label_map):
        try:
            assert_no_renumbering(read_label_map(production_label_map), known, str(label_map))
        except LabelMapError as exc:
            raise StageError(str(exc)) from None
    log = RejectionLog()
    inline_dir = Path(out_dir).with_name(Path(out_dir).name + "-inline")
    parsed, other, skipped = _parse_exports(inputs, fmt, images_root, log, inline_dir,
                                            options or {})
    records = apply_class_policy(_merge(parsed, log), known, unknown_classes, log)
    classes = Counter(box.label for record in records for box in record.boxes)
    ids = extend_label_map(known or {}, list(classes))
    summary = {
        "inputs": list(inputs),
        "images": len(records),
        "boxes": sum(classes.values()),
        "classes": dict(sorted(classes.items())),
        "rejected": len(log),
        "rejections_by_reason": log.by_reason(),
        **rejection_budget(log, len(records), max_rejected_share),
        "ignored_files": other,
        "skipped_files": skipped,
        "fingerprint": fingerprint(records, ids),
        "manifest": str(Path(out_dir) / "manifest.jsonl"),
        "label_map": str(Path(out_dir) / "label_map.pbtxt"),
        "rejections": str(Path(out_dir) / "rejections.jsonl"),
    }
    with storage.atomic_directory(out_dir) as tmp:
        write_manifest(tmp / "manifest.jsonl", records)
        storage.write_text(tmp / "label_map.pbtxt", format_label_map(ids))
        log.write(tmp / "rejections.jsonl")
        storage.write_text(tmp / SUMMARY, json.dumps(summary, indent=2))
    if not records:
        first = "; ".join(str(r) for r in log.items[:3])
        raise StageError(f"no usable records in {', '.join(inputs)}: {len(log)} rejected "
                         f"(e.g. {first}); see {summary['rejections']}")
    check_rejection_budget(summary, summary["rejections"])
    if datasets_dir:
        summary["new_version"] = publish_version(datasets_dir, out_dir, summary)
    return summary
