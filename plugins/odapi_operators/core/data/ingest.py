"""Ingest stage: annotation exports -> the run's dataset version + rejection report.

Reads every export given, parses it with the matching format parser (see `formats`), renames
aliased classes, merges each export's records by image key and applies the unknown-class
policy; then applies the exports, in landing order, to the parent version (`versions`) and
writes the whole version (manifest, label map), its diff, the rejections and the summary to
the stage folder in one atomic step, and publishes it (`datasets`). Bad files and boxes are
reported and skipped; an export with nothing usable, or one that cannot apply to the parent,
fails the stage. Class
names that differ only in case are warned about in the summary: they are two classes unless
`exports.class_aliases` makes them one.

Memory stays bounded whatever the number of boxes: each export's records are sorted by image
key on disk once they outgrow memory (`external_sort`), the parent version is read from its
manifest as a stream (manifests are in key order), and the version, its diff and fingerprint
are written while the streams are joined key by key (`versions.apply_exports`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from odapi_operators.core import storage
from odapi_operators.core.data import datasets, formats, versions
from odapi_operators.core.data.exports import Export, describe_export, make_export
from odapi_operators.core.data.formats import group_boxes
from odapi_operators.core.data.label_map import (
    LabelMapError,
    assert_no_renumbering,
    extend_label_map,
    format_label_map,
    read_label_map,
)
from odapi_operators.core.data.manifest import (
    Box,
    ImageRecord,
    Manifest,
    record_spool,
    records_by_key,
    write_manifest,
)
from odapi_operators.core.external_sort import ExternalSorter
from odapi_operators.core.failures import Failure
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.rejections import RecordError, RejectionLog, StageError
from odapi_operators.core.wording import setting

# Rejections that record a choice (an annotator's, COCO's crowd convention, or the config's
# classes / unknown_classes) rather than a defect of the export: the budget does not count them.
CHOICES = frozenset({"not accepted", "cancelled annotation", "superseded annotation",
                     "unlabeled task", "duplicate record", group_boxes.REASON, "unknown class",
                     "unknown class skipped", "class not selected", "no selected class"})
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
        self.deleted: str | None = None  # the export's deleted file
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


def _classify(root: Path, export_root: Path, fmt: str, deleted_file: str | None,
              log: RejectionLog, files: _Files) -> int:
    """Add the files below `root` (a folder or one file of the export at `export_root`) to
    `files`; how many were known. The export's deleted file is noted, never parsed (a YOLO
    parser would take a .txt for labels).

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
        if deleted_file and Path(os.path.relpath(path, export_root)) == Path(deleted_file):
            files.deleted = str(path)
            known += 1
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


@dataclass
class _Parsed:
    """One export as parsed: its items (a folder, or the files given one by one), the
    records its files gave (aliased, their images there, sorted by key) and its deleted
    file, if it has one."""

    items: list[str]
    root: Path
    records: ExternalSorter[ImageRecord]
    deleted_file: str | None


def _image_missing(record: ImageRecord, log: RejectionLog) -> bool:
    """True, with a rejection, for a record of a local image that is not there."""
    if record.source.kind == "local" and not os.path.isfile(record.source.uri):
        log.add(RecordError(record.provenance.get("file", "?"), record.source_id,
                            f"missing image: {record.source.uri}").rejection)
        return True
    return False


def _parse_exports(inputs: list[str], fmt: str, images_root: str | None, log: RejectionLog,
                   inline_dir: Path, options: dict, notes: Counter[str],
                   deleted_file: str | None = None, class_aliases: dict[str, str] | None = None,
                   aliased: Counter[str] | None = None
                   ) -> tuple[list[_Parsed], list[str], dict[str, str]]:
    parsed: list[_Parsed] = []
    ignored: list[str] = []
    skipped: dict[str, str] = {}
    tried = fmt if fmt != "auto" else ", ".join(formats.AVAILABLE)
    for items in _exports(inputs):
        files = _Files()
        root = _export_root(items)
        for item in items:
            if not _classify(Path(item), root, fmt, deleted_file, log, files) and \
                    not Path(item).is_dir():
                raise StageError(f"{item}: no annotation files found (formats tried: {tried})")
        ignored.extend(files.other)
        skipped.update(files.skipped)
        if not files.claimed and not files.deleted:
            raise StageError(f"{', '.join(items)}: no annotation files found ({files.count} "
                             f"files; formats tried: {tried})")
        ctx = formats.ParseContext(export_root=root,
                                   images_root=Path(images_root) if images_root else None,
                                   log=log, inline_dir=inline_dir, options=options,
                                   notes=notes)
        records = records_by_key()
        for name, paths in sorted(files.claimed.items()):
            for record in formats.load(name).parse(sorted(paths), ctx):
                record = alias_record(record, class_aliases, aliased)
                if not _image_missing(record, log):
                    records.add(record)
        records.settle()
        parsed.append(_Parsed(items, root, records, files.deleted))
    return parsed, ignored, skipped


def _landing(export: _Parsed, marker: str | None) -> Export:
    """When and in what state the export landed (`exports.describe_export`); files given one
    by one are one export rooted at their common folder."""
    if len(export.items) == 1 and Path(export.items[0]).is_dir():
        return describe_export(export.items[0], marker)
    files = {os.path.relpath(item, export.root): storage.stat(item) for item in export.items}
    return make_export(str(export.root), files, marker)


UNKNOWN_CLASS_POLICIES = ("add", "skip", "reject")


def _merge(records: Iterable[ImageRecord], log: RejectionLog) -> Iterator[ImageRecord]:
    """One record per image key within one export, from records sorted by key (stable: the
    first given first): a second record of a key is rejected (labels conflict within an
    export; across exports the later export wins instead)."""
    first: ImageRecord | None = None
    for record in records:
        if first is None or record.key != first.key:
            first = record
            yield record
            continue
        same = first.boxes == record.boxes
        reason = "duplicate record" if same else "conflicting duplicate"
        log.add(RecordError(record.provenance.get("file", "?"), record.source_id,
                            f"{reason}: image key {record.key} already given by "
                            f"{first.provenance.get('file')}").rejection)


def check_class_policy(policy: str) -> None:
    if policy not in UNKNOWN_CLASS_POLICIES:
        raise StageError(f"{setting('exports.unknown_classes')} must be one of "
                         f"{', '.join(UNKNOWN_CLASS_POLICIES)}, got {policy!r}")


def apply_class_policy(records: Iterable[ImageRecord], known: dict[str, int] | None,
                       policy: str, log: RejectionLog) -> Iterator[ImageRecord]:
    """Handle classes missing from `known`: add them, skip their boxes, or reject the image.

    Skipping a box leaves an unlabeled object in the image, so it is reported per image.
    """
    check_class_policy(policy)
    if known is None or policy == "add":
        yield from records
        return
    for record in records:
        unknown = sorted({b.label for b in record.boxes if b.label not in known})
        if not unknown:
            yield record
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
        yield replace(record, boxes=boxes)


def check_aliases(aliases: dict[str, str]) -> None:
    """Refuse a chain (a -> b, b -> c): each name maps straight to its class, in one step."""
    chained = sorted(name for name, target in aliases.items()
                     if target in aliases and aliases[target] != target)
    if chained:
        raise StageError(f"{setting('exports.class_aliases')}: {', '.join(map(repr, chained))} "
                         f"map to names that are aliased again; map each name straight to its "
                         "class", Failure.CONFIG)


def alias_record(record: ImageRecord, aliases: dict[str, str] | None,
                 renamed: Counter[str] | None) -> ImageRecord:
    """`record` with aliased classes renamed in every box, counting the boxes renamed per
    alias in `renamed`, so the summary shows what the aliases did."""
    if not aliases or not any(b.label in aliases for b in record.boxes):
        return record

    def alias(box: Box) -> Box:
        target = aliases.get(box.label, box.label)
        if target == box.label:
            return box
        if renamed is not None:
            renamed[f"{box.label} -> {target}"] += 1
        return replace(box, label=target)

    return replace(record, boxes=tuple(alias(b) for b in record.boxes))


def _uses(name: str, classes: Counter[str], known: dict[str, int]) -> str:
    """'Butterfly' (label map, 12 boxes)"""
    uses = (["label map"] if name in known else []) + \
        ([f"{classes[name]} box{'es' if classes[name] > 1 else ''}"] if classes[name] else [])
    return f"{name!r} ({', '.join(uses)})"


def case_variant_warnings(classes: Counter[str], known: dict[str, int] | None) -> list[str]:
    """One warning per set of class names that differ only in case ("Butterfly" and
    "butterfly" in one Label Studio project): they would silently become separate classes.
    The label map's names count too. Each warning names the variants and the alias to set."""
    known = known or {}
    variants: dict[str, set[str]] = defaultdict(set)
    for name in [*classes, *known]:
        variants[name.casefold()].add(name)
    warnings = []
    for names in variants.values():
        if len(names) < 2:
            continue
        # the label map's spelling wins, else the most used one, else the Capitalized one
        target = max(sorted(names), key=lambda n: (n in known, classes[n], n == n.capitalize()))
        described = ", ".join(_uses(n, classes, known) for n in sorted(names))
        aliases = {n: target for n in sorted(names) if n != target}
        warnings.append(f"class names differ only in case: {described} are {len(names)} "
                        f"classes; if they are one, set "
                        f"{setting('exports.class_aliases', aliases)}")
    return warnings


def group_box_summary(options: dict, notes: Counter[str]) -> dict:
    """The group-box policy and what it did, so neither choice goes unreported."""
    return {"policy": options.get("group_boxes") or "skip",
            "kept": notes[group_boxes.KEPT], "skipped": notes[group_boxes.SKIPPED]}


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
                         f"above the budget of {limit:.1%} set by "
                         f"{setting('exports.max_rejected_share')}; "
                         f"see {report}")


class Fingerprint:
    """Content fingerprint of a dataset version, taken while its records stream by: same
    records in, same fingerprint out. It starts with the label map, which is known only
    once every record is seen, so the records' part is spooled (to disk when large) until
    `hexdigest`."""

    SPOOL_BYTES = 64 << 20

    def __init__(self) -> None:
        self.spool = tempfile.SpooledTemporaryFile(max_size=self.SPOOL_BYTES)

    def add(self, record: ImageRecord) -> None:
        content = {"key": record.key, "boxes": [list(b.__dict__.values()) for b in record.boxes],
                   "size": [record.width, record.height], "source": record.source.uri,
                   "md5": record.md5, "rotation": record.rotation}
        self.spool.write(json.dumps(content, sort_keys=True).encode())

    def hexdigest(self, label_map: dict[str, int] | None) -> str:
        digest = hashlib.sha256(json.dumps(sorted((label_map or {}).items())).encode())
        self.spool.seek(0)
        while chunk := self.spool.read(1 << 20):
            digest.update(chunk)
        self.spool.close()
        return digest.hexdigest()[:16]


@dataclass
class _Base:
    """What a run's version builds on: the parent (the current version, or for a re-run the
    parent its first ingest recorded), its manifest, label map and newest landing time."""

    parent: str | None = None
    manifest: Path | None = None
    label_map: dict[str, int] | None = None
    newest_landed_at: str | None = None
    first: dict | None = None  # the run's record from its first ingest, for a re-run

    @classmethod
    def load(cls, datasets_dir: str | None, run_id: str | None) -> _Base:
        if not datasets_dir:
            return cls()
        first = datasets.run_record(datasets_dir, run_id)
        parent = first["parent"] if first else datasets.current_version(datasets_dir)
        if parent is None:
            return cls(first=first)
        summary = datasets.read_json(datasets_dir, parent, SUMMARY)
        return cls(parent, datasets.version_manifest(datasets_dir, parent),
                   datasets.version_label_map(datasets_dir, parent),
                   summary.get("newest_landed_at"), first)

    @property
    def name(self) -> str:
        return f"version {self.parent}" if self.parent else "the empty dataset"

    def records(self) -> Iterable[ImageRecord]:
        """The parent's records in key order, read from its manifest each time."""
        return Manifest(self.manifest) if self.manifest else []


def _deltas(exports: list[_Parsed], known: dict[str, int] | None, unknown_classes: str,
            log: RejectionLog, marker: str | None, mode: str, modes: dict[str, str] | None
            ) -> list[versions.ExportDelta]:
    """Each export as a delta, in landing order: its records merged (one per key, in key
    order) and through the class policy; its mode, landing time and deleted list."""
    deltas = []
    for export in exports:
        records = record_spool()
        for record in apply_class_policy(_merge(export.records, log), known, unknown_classes,
                                         log):
            records.append(record)
        export.records.close()
        landed = _landing(export, marker)
        deltas.append(versions.ExportDelta(
            path=landed.path, fingerprint=landed.fingerprint,
            landed_at=versions.iso(landed.landed_at),
            mode=versions.export_mode(landed.path, mode, modes), records=records,
            deleted=versions.read_deleted(export.deleted_file) if export.deleted_file else [],
            deleted_file=export.deleted_file))
    return sorted(deltas, key=lambda d: d.landed_at)


def _write_version(folder: Path, applied: versions.Applied, changes: versions.Diff,
                   taken: Fingerprint) -> int:
    """Write the version's manifest to `folder` as its records stream out of `applied`,
    feeding the diff and the fingerprint on the way; how many records were written."""

    def records() -> Iterator[ImageRecord]:
        for before, after in applied.changes():
            changes.add(before, after)
            if after is not None:
                taken.add(after)
                yield after

    return write_manifest(folder / "manifest.jsonl", records())


def ingest(inputs: list[str], out_dir: str | Path, images_root: str | None = None,
           fmt: str = "auto", options: dict | None = None, label_map: str | None = None,
           unknown_classes: str = "add", datasets_dir: str | None = None,
           production_label_map: str | None = None,
           max_rejected_share: float | None = None,
           class_aliases: dict[str, str] | None = None, *, run_id: str | None = None,
           marker: str | None = None, mode: str = "incremental",
           modes: dict[str, str] | None = None, deleted_file: str | None = "deleted.txt",
           rebuild: bool = False) -> dict:
    """Parse `inputs` (files or export folders) into the dataset version they make; write it
    to `out_dir` and return the summary.

    The version is the parent's records (the current version in `datasets_dir`; for a re-run
    of `run_id`, the parent its first ingest recorded) with each export applied in landing
    order (`marker`'s time) in its mode (`mode`, or the first `modes` glob matching its path;
    see `versions`): a re-labelled image takes the later labels, an export's `deleted_file`
    removes images, a snapshot removes what it lacks. `rebuild` (`run.take_exports: all`)
    starts from no records but still diffs against the parent. Without `datasets_dir` the
    exports alone make the version.

    Writes `manifest.jsonl` (the whole version), `label_map.pbtxt` (the given `label_map`,
    else the parent's, extended append-only when `unknown_classes` is "add"),
    `rejections.jsonl`, `diff.json` (against the parent) and `summary.json` atomically, then
    publishes the version in `datasets_dir` unless the same content is there already. Images
    embedded in an export are written, by content hash, to `<out_dir>-inline/`. A
    `label_map` that renumbers `production_label_map`'s classes is refused. More rejections
    than `max_rejected_share` of what this run's exports gave fail the stage (outputs
    written, no version published); None checks no budget. `class_aliases` renames classes
    (`{"butterfly": "Butterfly"}`) before anything else sees them; `options["group_boxes"]`
    ("skip" or "keep") is the group-box policy.
    """
    if fmt != "auto":
        try:
            formats.load(fmt)
        except ValueError as exc:
            raise StageError(str(exc)) from None
    if not inputs:
        raise StageError("no annotation exports given")
    options = options or {}
    if (options.get("group_boxes") or "skip") not in group_boxes.POLICIES:
        raise StageError(f"{setting('exports.group_boxes')} must be one of "
                         f"{', '.join(group_boxes.POLICIES)}, got {options['group_boxes']!r}",
                         Failure.CONFIG)
    check_aliases(class_aliases or {})
    check_class_policy(unknown_classes)
    for key, value in [("exports.mode", mode), *(("exports.modes", m) for m in
                                                  (modes or {}).values())]:
        if value not in versions.MODES:
            raise StageError(f"{setting(key)}: a mode is one of {', '.join(versions.MODES)}, "
                             f"got {value!r}", Failure.CONFIG)
    known = read_label_map(label_map) if label_map and storage.exists(label_map) else None
    if known is not None and production_label_map and storage.exists(production_label_map):
        try:
            assert_no_renumbering(read_label_map(production_label_map), known, str(label_map))
        except LabelMapError as exc:
            raise StageError(str(exc)) from None
    base = _Base.load(datasets_dir, run_id)
    if base.first:  # a re-run keeps the label map its first ingest started from
        known = base.first.get("label_map")
    log = RejectionLog()
    inline_dir = Path(out_dir).with_name(Path(out_dir).name + "-inline")
    notes: Counter[str] = Counter()
    aliased: Counter[str] = Counter()
    parsed, other, skipped = _parse_exports(inputs, fmt, images_root, log, inline_dir,
                                            options, notes, deleted_file, class_aliases,
                                            aliased)
    deltas = _deltas(parsed, known, unknown_classes, log, marker, mode, modes)
    applied = versions.apply_exports(
        base.records(), deltas, parent_name=str(base.manifest),
        base_name="the rebuilt dataset" if rebuild else base.name,
        newest_landed_at=None if rebuild else base.newest_landed_at, rebuild=rebuild)
    changes, taken = versions.Diff(), Fingerprint()
    with storage.atomic_directory(out_dir) as tmp:
        images = _write_version(tmp, applied, changes, taken)
        classes = changes.classes_after
        ids = extend_label_map(known if known is not None else base.label_map or {},
                               list(classes))
        head = {"parent": base.parent, "exports": [d.describe() for d in deltas]}
        newest = max([d.landed_at for d in deltas] +
                     ([base.newest_landed_at] if base.newest_landed_at and not rebuild else []))
        version_fingerprint = taken.hexdigest(ids)
        summary = {
            "inputs": list(inputs),
            "images": images,
            "boxes": sum(classes.values()),
            "classes": dict(sorted(classes.items())),
            "rejected": len(log),
            "rejections_by_reason": log.by_reason(),
            **rejection_budget(log, sum(len(d.records) for d in deltas), max_rejected_share),
            "ignored_files": other,
            "skipped_files": skipped,
            "group_boxes": group_box_summary(options, notes),
            "aliased": dict(sorted(aliased.items())),
            "warnings": case_variant_warnings(classes, known),
            "fingerprint": version_fingerprint,
            "run_id": run_id,
            "parent": base.parent,
            "rebuild": rebuild,
            "exports": head["exports"],
            **changes.counts(),
            "superseded": applied.superseded,
            "newest_landed_at": newest,
            "manifest": str(Path(out_dir) / "manifest.jsonl"),
            "label_map": str(Path(out_dir) / "label_map.pbtxt"),
            "rejections": str(Path(out_dir) / "rejections.jsonl"),
            "diff": str(Path(out_dir) / datasets.DIFF),
            "version": str(Path(datasets_dir) / version_fingerprint) if datasets_dir else None,
        }
        storage.write_text(tmp / "label_map.pbtxt", format_label_map(ids))
        log.write(tmp / "rejections.jsonl")
        changes.write(tmp / datasets.DIFF, head)
        storage.write_text(tmp / SUMMARY, json.dumps(summary, indent=2))
    for delta in deltas:
        delta.records.close()
    if not images or not any(d.records or d.deleted or d.mode == "snapshot" for d in deltas):
        first = "; ".join(str(r) for r in log.items[:3])
        raise StageError(f"no usable records in {', '.join(inputs)}: {len(log)} rejected "
                         f"(e.g. {first}); see {summary['rejections']}")
    check_rejection_budget(summary, summary["rejections"])
    if datasets_dir:
        summary["new_version"] = datasets.publish_version(datasets_dir, out_dir, summary)
        kept = datasets.record_run(datasets_dir, {
            "run_id": run_id, "parent": base.parent, "fingerprint": version_fingerprint,
            "label_map": known, "rebuild": rebuild,
            "exports": [d.path for d in deltas]})
        if kept["fingerprint"] != version_fingerprint:
            summary["warnings"].append(
                f"run {run_id} gave version {kept['fingerprint']} the first time and "
                f"{version_fingerprint} now: its exports changed since")
    return summary

