"""Open Images V4+/V6 box CSVs: the files of one export, in any order, told apart by header.

- boxes: `ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,...` with
  coordinates already normalized 0..1 (columns are found by name; ImageID, LabelName, XMin,
  XMax, YMin, YMax are required). Several boxes CSVs (train/validation/test) may be given.
- class descriptions: `MID,Name` without header (`/m/0199g,Bicycle`, V4-V6
  class-descriptions-boxable.csv) or with the V6/V7 header `LabelName,DisplayName`.
- image index (optional): `ImageID,Subset,OriginalURL,...,OriginalMD5,...,Rotation`; only
  ImageID and one of OriginalURL or Subset are required. OriginalMD5 is base64 of the digest
  and is stored as lowercase hex (a 32-digit hex value is accepted too). Rotation is
  0/90/180/270 degrees COUNTERclockwise (Open Images' convention; empty or nan = unknown = 0)
  and is stored in `ImageRecord.rotation`, which counts CLOCKWISE: 90 becomes 270.

Image source: the index's OriginalURL; an image without one is looked up in the images root,
else the export folder: as `<Subset>/<ImageID>.jpg` or `images/<Subset>/<ImageID>.jpg` when
the index names its Subset (train/validation/test, Open Images' own folders), else as
`<ImageID>.jpg`; else rejected.

Class names come from the descriptions; `options["classes"]` (names, case-insensitive, or
MIDs) keeps only those classes: one rejection per image sums up its skipped boxes ("class
not selected: 3 boxes (Person, Tree)"), and an image left with no box is dropped with one
rejection ("no selected class: image dropped, ...").
`IsGroupOf=1` boxes (optional column) are group boxes: skipped or kept as
`exports.group_boxes` says, always reported (`group_boxes.py`): skipped ones with one rejection
per image, an image left with only group boxes is dropped.

The other CSVs that sit next to the boxes in an Open Images download (image-level labels,
segmentation masks, visual relationships, point labels) carry no boxes: `companion_note`
names them so ingest skips them with a note instead of reporting them as rejections.

Streaming. No CSV is ever loaded whole; every file is read line by line. A boxes CSV is first
scanned once for its ImageID order (a cheap pass over the first field). Open Images' own CSVs
are sorted by ImageID, and then each image's rows are one run, flushed as soon as the next
ImageID starts: memory stays one image, whatever the file size. An unsorted boxes CSV's rows
are sorted by ImageID first (`external_sort`: on disk once they outgrow memory), then read
the same way; records come out in ImageID order either way. The index is merge-joined
alongside, sorted the same way first if it is not sorted: memory stays bounded whatever the
size of either file.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import sys
from collections import Counter
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from odapi_operators.core.data.boxes import checked_box
from odapi_operators.core.data.formats import group_boxes
from odapi_operators.core.data.formats.common import (
    first_line_fields,
    parses_as_float,
    read_csv_lines,
)
from odapi_operators.core.data.manifest import Box, ImageRecord, ImageSource, key_from_id
from odapi_operators.core.external_sort import ExternalSorter
from odapi_operators.core.rejections import Rejection
from odapi_operators.core.wording import setting

if TYPE_CHECKING:
    from odapi_operators.core.data.formats import ParseContext

NAME = "openimages"
SUFFIXES = (".csv",)

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")
INDEX_SOURCES = ("OriginalURL", "Subset")  # an index names at least one of them
DESCRIPTIONS_HEADER = ("LabelName", "DisplayName")
ROTATIONS = (0, 90, 180, 270)
_HEX_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")
_MAX_NAMES = 8  # class names listed in one rejection reason


def _row_bytes(row: tuple) -> int:
    return 350  # a parsed boxes row held for sorting (tracemalloc)


def _entry_bytes(entry: tuple) -> int:
    return 600  # an index row's four fields held for sorting

Report = Callable[[str, str, str], None]
IndexEntry = tuple[str, int, str, str, str, str]  # file, line, URL, MD5, Rotation, Subset


def _is_description(fields: list[str]) -> bool:
    return len(fields) == 2 and fields[0].strip().startswith(("/m/", "/g/"))


def _companion_kind(fields: list[str]) -> str | None:
    """What a standard Open Images CSV without boxes holds, from its header; else None."""
    if fields[:1] == ["ImageID"] and "Confidence" in fields and "XMin" not in fields:
        return "image-level labels"
    if fields[:2] == ["MaskPath", "ImageID"]:
        return "segmentation masks"
    if fields[:2] == ["ImageID1", "ImageID2"]:
        return "visual relationships"
    if fields[:1] == ["ImageId"] and "X" in fields and "Y" in fields:
        return "point labels"
    return None


def companion_note(path: Path, head: bytes) -> str | None:
    """Why a standard Open Images companion CSV is not read; None for the files parsed."""
    kind = _companion_kind(first_line_fields(head))
    return f"Open Images {kind}, no boxes to read (not a rejection)" if kind else None


def sniff(path: Path, head: bytes) -> bool:
    fields = first_line_fields(head)
    return bool(fields) and (
        (fields[0] == "ImageID" and len(fields) > 1)
        or _is_description(fields) or tuple(fields) == DESCRIPTIONS_HEADER
        or _companion_kind(fields) is not None)


def _classify(path: Path) -> tuple[str, dict[str, int], int, bool]:
    """(kind, column index by header name, column count, has a header line)."""
    for _, fields, error in read_csv_lines(path):
        if error:
            raise ValueError(error)
        assert fields is not None
        names = [f.strip() for f in fields]
        columns: dict[str, int] = {}
        for index, name in enumerate(names):
            columns.setdefault(name, index)
        if names[0] == "ImageID":
            if all(c in columns for c in BOX_COLUMNS):
                return "boxes", columns, len(names), True
            if any(c in columns for c in INDEX_SOURCES):
                return "index", columns, len(names), True
            raise ValueError(f"unrecognised Open Images CSV: header {','.join(names)!r} has "
                             "neither the box columns (LabelName, XMin, XMax, YMin, YMax) nor "
                             "an image index's OriginalURL or Subset")
        if tuple(names) == DESCRIPTIONS_HEADER:
            return "descriptions", {}, 2, True
        if _is_description(names):
            return "descriptions", {}, 2, False
        raise ValueError(f"unrecognised Open Images CSV: first line {','.join(names)!r}")
    raise ValueError("empty file: no header line")


def _sorted_by_id(path: Path, column: int) -> bool:
    """True if the data rows' ImageIDs never decrease (one cheap pass, first field only)."""
    previous = None
    if column == 0:
        with open(path, "rb") as fh:
            next(fh, None)  # header
            for raw in fh:
                key = raw.split(b",", 1)[0].strip()
                if not key:
                    continue
                if previous is not None and key < previous:
                    return False
                previous = key
        return True
    rows = read_csv_lines(path)
    next(rows, None)
    for _, fields, _ in rows:
        if fields is None or len(fields) <= column:
            continue
        if previous is not None and fields[column] < previous:
            return False
        previous = fields[column]
    return True


def md5_hex(raw: str) -> str | None:
    raw = raw.strip()
    if not raw or raw.lower() == "nan":
        return None
    if _HEX_MD5.match(raw):
        return raw.lower()
    try:
        digest = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 16:
        raise ValueError(f"invalid md5: OriginalMD5 {raw!r} is not base64 (or hex) of a "
                         "16-byte digest")
    return digest.hex()


def rotation_clockwise(raw: str) -> int:
    """Open Images' counterclockwise Rotation -> our clockwise degrees (unknown -> 0)."""
    raw = raw.strip()
    if not raw or raw.lower() == "nan":
        return 0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if value not in ROTATIONS:
        raise ValueError(f"invalid rotation: Rotation {raw!r} is not one of 0, 90, 180, 270")
    return (360 - int(value)) % 360


class _IndexFile:
    def __init__(self, path: Path, columns: dict[str, int], count: int, report: Report):
        self.path, self.columns, self.count, self.report = path, columns, count, report
        self._sorted: bool | None = None
        self._by_id: ExternalSorter[tuple[str, IndexEntry]] | None = None

    def by_id(self) -> Iterable[tuple[str, IndexEntry]]:
        """`entries` in ImageID order: as read if the file is sorted, else sorted once (on
        disk when large) and kept for the next boxes CSV."""
        if self._sorted is None:
            self._sorted = _sorted_by_id(self.path, self.columns["ImageID"])
        if self._sorted:
            return self.entries()
        if self._by_id is None:
            self._by_id = ExternalSorter(key=itemgetter(0), weight=_entry_bytes)
            self._by_id.extend(self.entries())
            self._by_id.settle()
        return self._by_id

    def close(self) -> None:
        if self._by_id is not None:
            self._by_id.close()

    def entries(self) -> Iterator[tuple[str, IndexEntry]]:
        """(ImageID, (file, line, OriginalURL, OriginalMD5, Rotation, Subset)) per well-formed
        row; only the four fields used are kept ("" where the column is absent)."""
        file, id_col = str(self.path), self.columns["ImageID"]
        wanted = [self.columns.get(c)
                  for c in ("OriginalURL", "OriginalMD5", "Rotation", "Subset")]
        rows = read_csv_lines(self.path)
        next(rows, None)
        for number, fields, error in rows:
            if error:
                self.report(file, f"line {number}", error)
            elif len(fields) != self.count:
                self.report(file, f"line {number}", f"wrong column count: expected "
                                                    f"{self.count} fields, got {len(fields)}")
            elif not fields[id_col].strip():
                self.report(file, f"line {number}", "missing value: no ImageID")
            else:
                url, md5, rotation, subset = ("" if i is None else fields[i] for i in wanted)
                yield fields[id_col].strip(), (file, number, url, md5, rotation, subset.strip())


class _MergedIndex:
    """Lookups in increasing ImageID order against index files in ImageID order (the first
    file's first row of an ImageID wins): constant memory."""

    def __init__(self, files: list[_IndexFile]):
        self.cursors = [iter(f.by_id()) for f in files]
        self.heads = [next(c, None) for c in self.cursors]

    def get(self, image_id: str):
        for i, cursor in enumerate(self.cursors):
            head = self.heads[i]
            while head is not None and head[0] < image_id:
                head = next(cursor, None)
            self.heads[i] = head
            if head is not None and head[0] == image_id:
                return head[1]
        return None


class _Image:
    """One image's boxes, and the boxes it lost and why."""

    __slots__ = ("line", "boxes", "skipped", "unknown", "invalid", "grouped")

    def __init__(self, line: int):
        self.line = line
        self.boxes: list[Box] = []
        self.skipped: Counter | None = None
        self.unknown: Counter | None = None
        self.grouped: Counter | None = None  # skipped group boxes by class name
        self.invalid = 0


def _listed(counts: Counter) -> str:
    names = sorted(counts)
    more = f", ... {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else ""
    return ", ".join(names[:_MAX_NAMES]) + more


class _Parser:
    def __init__(self, ctx: ParseContext, report: Report, names: dict[str, str],
                 selected: set[str] | None):
        self.ctx, self.report, self.selected = ctx, report, selected
        self.mid_index = {mid: i for i, mid in enumerate(names)}
        self.label_names = list(names.values())
        self.keep_groups = group_boxes.keeps(ctx)

    # -- rows -----------------------------------------------------------------------------
    def rows(self, path: Path, columns: dict[str, int], count: int, quiet: bool = False):
        """(line, ImageID, MID, [xmin, xmax, ymin, ymax], IsGroupOf) per well-formed row."""
        file = str(path)
        report = (lambda *_: None) if quiet else self.report
        id_col, label_col = columns["ImageID"], columns["LabelName"]
        group_col = columns.get("IsGroupOf")
        coord_cols = [(c, columns[c]) for c in ("XMin", "XMax", "YMin", "YMax")]
        x0, x1, y0, y1 = (i for _, i in coord_cols)
        lines = read_csv_lines(path)
        next(lines, None)  # header
        for number, fields, error in lines:
            if error:
                report(file, f"line {number}", error)
                continue
            if len(fields) != count:
                report(file, f"line {number}", f"wrong column count: expected {count} "
                                               f"fields, got {len(fields)}")
                continue
            image_id = fields[id_col].strip()
            if not image_id:
                report(file, f"line {number}", "missing value: no ImageID")
                continue
            mid = fields[label_col].strip()
            if not mid:
                report(file, f"line {number}", "missing value: no LabelName")
                continue
            try:
                coords = (float(fields[x0]), float(fields[x1]), float(fields[y0]),
                          float(fields[y1]))
            except ValueError:
                bad = next((name, fields[i]) for name, i in coord_cols
                           if not parses_as_float(fields[i]))
                report(file, f"line {number}", f"not a number: {bad[0]} is {bad[1]!r}")
                continue
            group = group_col is not None and fields[group_col].strip() == "1"
            yield number, image_id, sys.intern(mid), coords, group

    def add(self, image: _Image, file: str, number: int, mid: str, coords: tuple[float, ...],
            group: bool = False) -> None:
        index = self.mid_index.get(mid)
        if index is None:
            image.unknown = image.unknown or Counter()
            image.unknown[mid] += 1
            return
        if self.selected is not None and mid not in self.selected:
            image.skipped = image.skipped or Counter()
            image.skipped[self.label_names[index]] += 1
            return
        xmin, xmax, ymin, ymax = coords
        try:
            box = checked_box(self.label_names[index], xmin, ymin, xmax, ymax)
        except ValueError as exc:
            self.report(file, f"line {number}", str(exc))
            image.invalid += 1
            return
        if group:
            group_boxes.counted(self.ctx, self.keep_groups)
            if not self.keep_groups:
                image.grouped = image.grouped or Counter()
                image.grouped[self.label_names[index]] += 1
                return
        image.boxes.append(box)

    # -- grouping -------------------------------------------------------------------------
    def runs(self, rows: Iterable[tuple], file: str) -> Iterator[tuple[str, _Image]]:
        """(ImageID, _Image) per run of `rows` (`rows`), which are in ImageID order."""
        current, image, warned = None, None, False
        for number, image_id, mid, coords, group in rows:
            if image_id != current:
                if image is not None:
                    yield current, image
                if current is not None and image_id < current and not warned:
                    warned = True  # the pre-scan said sorted: the file changed meanwhile?
                    self.report(file, f"line {number}", "unsorted boxes CSV: ImageID "
                                f"{image_id} after {current}; its images may be split")
                current, image = image_id, _Image(number)
            self.add(image, file, number, mid, coords, group)
        if image is not None:
            yield current, image

    # -- records --------------------------------------------------------------------------
    def local_places(self, image_id: str, subset: str) -> list[Path]:
        """Where a local copy of the image may be, most specific first: Open Images keeps each
        Subset's images in its own folder; ValueError for a name that leaves the root."""
        names = [f"{subset}/{image_id}.jpg", f"images/{subset}/{image_id}.jpg"] if subset else []
        return [self.ctx.resolve_image(name, relative_to=self.ctx.export_root)
                for name in [*names, f"{image_id}.jpg"]]

    def record(self, path: Path, image_id: str, image: _Image, index) -> ImageRecord | None:
        file, where = str(path), f"line {image.line}: ImageID {image_id}"
        kept = len(image.boxes)
        skipped = sum(image.skipped.values()) if image.skipped else 0
        unknown = sum(image.unknown.values()) if image.unknown else 0
        grouped = sum(image.grouped.values()) if image.grouped else 0
        if not kept:
            if grouped and not (skipped or unknown or image.invalid):
                reason = group_boxes.dropped_reason(grouped, f"IsGroupOf=1: "
                                                             f"{_listed(image.grouped)}")
            elif skipped and not unknown and not image.invalid and not grouped:
                reason = (f"no selected class: image dropped, {skipped} boxes "
                          f"({_listed(image.skipped)})")
            elif unknown and not skipped and not image.invalid and not grouped:
                reason = (f"unknown MID: image dropped, {unknown} boxes with MID "
                          f"{_listed(image.unknown)} not in the class descriptions")
            else:
                parts = [f"{skipped} not selected ({_listed(image.skipped)})" if skipped else "",
                         f"{unknown} with unknown MID ({_listed(image.unknown)})"
                         if unknown else "",
                         f"{image.invalid} invalid" if image.invalid else "",
                         f"{grouped} group boxes ({_listed(image.grouped)})" if grouped else ""]
                reason = f"no usable box: image dropped, {'; '.join(p for p in parts if p)}"
            self.report(file, where, reason)
            return None
        if unknown:
            self.report(file, where, f"unknown MID: {unknown} boxes with MID "
                                     f"{_listed(image.unknown)} not in the class descriptions")
        if skipped:
            self.report(file, where, f"class not selected: {skipped} boxes "
                                     f"({_listed(image.skipped)})")
        if grouped:
            self.report(file, where, group_boxes.skipped_reason(
                f"{grouped} boxes with IsGroupOf=1 ({_listed(image.grouped)})"))
        md5, rotation, url, subset = None, 0, "", ""
        provenance = {"format": "openimages", "file": file, "line": image.line}
        found = index.get(image_id) if index is not None else None
        if found is not None:
            index_path, index_line, url, md5_raw, rotation_raw, subset = found
            provenance["index"] = f"{index_path}:{index_line}"
            try:
                rotation = rotation_clockwise(rotation_raw)
                md5 = md5_hex(md5_raw)
            except ValueError as exc:
                self.report(index_path, f"line {index_line}: ImageID {image_id}", str(exc))
                return None
            url = url.strip()
        if url.lower().startswith(("http://", "https://")):
            source = ImageSource("url", url)
        elif url.lower().startswith("gs://"):
            source = ImageSource("gs", url)
        elif url:
            self.report(provenance.get("index", file), f"ImageID {image_id}",
                        f"invalid URL: OriginalURL {url!r} is not http(s):// or gs://")
            return None
        else:
            md5 = None  # the checksum is the original file's; a local copy may be re-encoded
            try:
                places = self.local_places(image_id, subset)
            except ValueError as exc:
                self.report(file, where, str(exc))
                return None
            local = next((p for p in places if p.is_file()), None)
            if local is None:
                why = "empty OriginalURL" if found is not None else "no index row"
                self.report(file, where, f"missing image: no URL or file for ImageID "
                                         f"{image_id} ({why}, no "
                                         f"{' or '.join(map(str, places))})")
                return None
            source = ImageSource("local", str(local))
        return ImageRecord(key=key_from_id(image_id), source=source, source_id=image_id,
                           width=None, height=None, boxes=tuple(image.boxes),
                           provenance=provenance,
                           md5=md5, rotation=rotation)


def _load_descriptions(files: list[tuple[Path, bool]], report: Report) -> dict[str, str]:
    names: dict[str, str] = {}
    for path, has_header in files:
        file = str(path)
        rows = read_csv_lines(path)
        if has_header:
            next(rows, None)
        for number, fields, error in rows:
            if error:
                report(file, f"line {number}", error)
                continue
            if len(fields) != 2:
                report(file, f"line {number}", f"wrong column count: expected 2 fields "
                                               f"(MID,Name), got {len(fields)}")
                continue
            mid, name = fields[0].strip(), fields[1].strip()
            if not mid or not name:
                report(file, f"line {number}", "missing value: empty MID or class name")
            elif mid in names and names[mid] != name:
                report(file, f"line {number}", f"conflicting class description: {mid} is "
                                               f"{names[mid]!r} and {name!r}; kept the first")
            else:
                names.setdefault(mid, name)
    return names


def _selection(ctx: ParseContext, names: dict[str, str], where: str,
               report: Report) -> set[str] | None:
    wanted = ctx.options.get("classes")
    if not wanted:
        return None
    if isinstance(wanted, str):
        wanted = [wanted]
    by_name: dict[str, set[str]] = {}
    for mid, name in names.items():
        by_name.setdefault(name.lower(), set()).add(mid)
    selected: set[str] = set()
    for item in wanted:
        item = str(item).strip()
        if item in names:
            selected.add(item)
        elif item.lower() in by_name:
            selected |= by_name[item.lower()]
        else:
            report(where, setting("exports.classes"), f"unknown selected class: {item!r} is "
                   "neither a MID nor a class name in the class descriptions")
    return selected


def parse(files: list[Path], ctx: ParseContext) -> Iterator[ImageRecord]:
    def report(file: str, record: str, reason: str) -> None:
        ctx.log.add(Rejection(str(file), record, reason))

    reported: set[tuple[str, str, str]] = set()

    def report_once(file: str, record: str, reason: str) -> None:
        if (file, record, reason) not in reported:  # an index is read once per boxes CSV
            reported.add((file, record, reason))
            report(file, record, reason)

    boxes, index_files, descriptions = [], [], []
    for path in map(Path, files):
        try:
            kind, columns, count, has_header = _classify(path)
        except ValueError as exc:
            report(str(path), "header", str(exc))
            continue
        except OSError as exc:
            report(str(path), "file", f"unreadable file: {exc}")
            continue
        if kind == "boxes":
            boxes.append((path, columns, count))
        elif kind == "index":
            index_files.append(_IndexFile(path, columns, count, report_once))
        else:
            descriptions.append((path, has_header))
    if not boxes:
        if files:
            report(str(files[0]), "export", "no boxes CSV: no file with the header ImageID,"
                                            "...,LabelName,...,XMin,XMax,YMin,YMax")
        return
    if not descriptions:
        report(str(boxes[0][0]), "export", "missing class descriptions: no MID,Name CSV "
                                           "among the export's files")
        return
    names = _load_descriptions(descriptions, report)
    selected = _selection(ctx, names, str(descriptions[0][0]), report)
    parser = _Parser(ctx, report, names, selected)
    try:
        for path, columns, count in boxes:
            try:
                yield from _parse_boxes(parser, path, columns, count, index_files)
            except OSError as exc:
                report(str(path), "file", f"unreadable file: {exc}")
    finally:
        for index_file in index_files:
            index_file.close()


def _parse_boxes(parser: _Parser, path: Path, columns: dict[str, int], count: int,
                 index_files: list[_IndexFile]) -> Iterator[ImageRecord]:
    """The records of one boxes CSV in ImageID order: its rows as read if it is sorted by
    ImageID, else sorted first (on disk when large)."""
    rows: Iterable[tuple] = parser.rows(path, columns, count)
    by_id = None
    if not _sorted_by_id(path, columns["ImageID"]):
        rows = by_id = ExternalSorter(key=itemgetter(1), weight=_row_bytes).extend(rows)
    try:
        index = _MergedIndex(index_files) if index_files else None
        for image_id, image in parser.runs(rows, str(path)):
            record = parser.record(path, image_id, image, index)
            if record is not None:
                yield record
    finally:
        if by_id is not None:
            by_id.close()
