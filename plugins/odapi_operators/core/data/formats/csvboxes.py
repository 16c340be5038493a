"""Plain CSV, one box per row (format name "csv"; the module is not called csv.py so it can
never shadow the standard library's csv module).

Recognised headers (case-insensitive, columns in this order):

    filename,width,height,class,xmin,ymin,xmax,ymax    pixels (the raccoon dataset's layout)
    path,xmin,ymin,xmax,ymax,label                     pixels; size read from the image file

Any other layout needs the `exports.csv_columns` option, mapping our names {image, label, xmin,
ymin, xmax, ymax, width?, height?} to the CSV's header names, and the format given explicitly
(`exports.format: csv`: a sniffer cannot see options); messages name these settings with
`wording.setting`, so they read as flags on the command line and as keys in a config.
`options["csv_normalized"] = True` says the coordinates are 0..1 (then width/height are
optional).

Images resolve with `ctx.resolve_image` relative to the CSV's folder (or the images root),
never outside it; http(s):// and gs:// values become remote sources keyed by URL. Rows are
read line by line (never the whole file), grouped into one record per image in order of first
appearance. A row whose label and coordinates are all empty declares an image without
objects (a negative). Bad rows are reported with their line number; an image whose rows
disagree about its size, or whose rows were all refused, is dropped and reported once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from PIL import Image

from odapi_operators.core.data.boxes import checked_box, checked_size, normalized_box
from odapi_operators.core.data.formats import remote_kind
from odapi_operators.core.data.formats.common import first_line_fields, read_csv_lines
from odapi_operators.core.data.manifest import Box, ImageRecord, ImageSource, key_from_url
from odapi_operators.core.rejections import Rejection
from odapi_operators.core.wording import setting

if TYPE_CHECKING:
    from odapi_operators.core.data.formats import ParseContext

NAME = "csv"
SUFFIXES = (".csv",)

OUR_COLUMNS = ("image", "label", "xmin", "ymin", "xmax", "ymax", "width", "height")
REQUIRED_COLUMNS = OUR_COLUMNS[:6]

LAYOUTS: dict[tuple[str, ...], dict[str, str]] = {
    ("filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax"): {
        "image": "filename", "width": "width", "height": "height", "label": "class",
        "xmin": "xmin", "ymin": "ymin", "xmax": "xmax", "ymax": "ymax"},
    ("path", "xmin", "ymin", "xmax", "ymax", "label"): {
        "image": "path", "label": "label",
        "xmin": "xmin", "ymin": "ymin", "xmax": "xmax", "ymax": "ymax"},
}


def sniff(path: Path, head: bytes) -> bool:
    """Only the two known headers; other layouts need the csv format and csv_columns."""
    return tuple(f.lower() for f in first_line_fields(head)) in LAYOUTS


def _columns(header: list[str], options: dict[str, Any]) -> dict[str, int]:
    """Our column name -> index in the CSV row; ValueError says what is wrong."""
    names = [h.strip().lower() for h in header]
    named = setting("exports.csv_columns")  # in the words of the user's interface
    mapping = options.get("csv_columns")
    if mapping:
        if not isinstance(mapping, dict):
            raise ValueError(f"bad {named}: expected a mapping of {', '.join(OUR_COLUMNS)} "
                             f"to header names, got {type(mapping).__name__}")
        unknown = sorted(set(mapping) - set(OUR_COLUMNS))
        if unknown:
            raise ValueError(f"bad {named}: unknown key(s) {', '.join(unknown)}; "
                             f"expected {', '.join(OUR_COLUMNS)}")
        missing = [c for c in REQUIRED_COLUMNS if not mapping.get(c)]
        if missing:
            raise ValueError(f"bad {named}: no column given for {', '.join(missing)}")
        if bool(mapping.get("width")) != bool(mapping.get("height")):
            raise ValueError(f"bad {named}: give both width and height, or neither")
    else:
        layout = LAYOUTS.get(tuple(names))
        if layout is None:
            raise ValueError(f"unrecognised CSV header: {','.join(header)!r}; expected "
                             + " or ".join(repr(",".join(k)) for k in LAYOUTS)
                             + f", or give {named} with "
                             f"{setting('exports.format', NAME)}")
        mapping = layout
    columns = {}
    for ours, theirs in mapping.items():
        if not theirs:
            continue
        wanted = str(theirs).strip().lower()
        if wanted not in names:
            raise ValueError(f"bad {named}: column {theirs!r} (for {ours}) is not in the "
                             f"header {','.join(header)!r}")
        columns[ours] = names.index(wanted)
    return columns


@dataclass
class _Image:
    name: str
    line: int
    source: ImageSource | None = None
    key: str = ""
    width: float | None = None
    height: float | None = None
    size_line: int = 0
    boxes: list[Box] = field(default_factory=list)
    refused: int = 0
    error: str | None = None  # set once; the image is then dropped and its later rows ignored
    error_line: int = 0
    ignored_rows: int = 0


def _image_size(path: Path) -> tuple[int, int]:
    """Pixel size from the image header only (Pillow opens lazily, decodes nothing)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable image: {path.name}: {exc}") from None


def _new_image(name: str, number: int, csv_path: Path, ctx: ParseContext,
               need_size: bool) -> _Image:
    image = _Image(name=name, line=number)
    try:
        remote = remote_kind(name)
    except ValueError as exc:
        image.error, image.error_line = str(exc), number
        return image
    if remote:
        image.source, image.key = ImageSource(remote, name), key_from_url(name)
        if need_size:
            image.error, image.error_line = ("unknown image size: a remote image needs width "
                                             "and height columns or csv_normalized"), number
        return image
    try:
        path = ctx.resolve_image(name, relative_to=csv_path.parent)
    except ValueError as exc:
        image.error, image.error_line = str(exc), number
        return image
    image.source = ImageSource("local", str(path))
    image.key = ctx.image_key(path, csv_path.parent)
    if need_size:
        if not os.path.isfile(path):
            image.error, image.error_line = f"missing image: {path}", number
            return image
        try:
            image.width, image.height = _image_size(path)
            image.size_line = number
        except ValueError as exc:
            image.error, image.error_line = str(exc), number
    return image


def _float(fields: list[str], columns: dict[str, int], name: str) -> float:
    raw = fields[columns[name]]
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"not a number: {name} is {raw!r}") from None


def parse_csv_file(csv_path: Path, ctx: ParseContext) -> Iterator[ImageRecord]:
    file = str(csv_path)
    normalized = bool(ctx.options.get("csv_normalized", False))
    columns: dict[str, int] | None = None
    width_in_rows = False
    images: dict[str, _Image] = {}
    for number, fields, error in read_csv_lines(csv_path):
        where = f"line {number}"
        if error:
            ctx.log.add(Rejection(file, where, error))
            continue
        assert fields is not None
        if columns is None:
            try:
                columns = _columns(fields, ctx.options)
            except ValueError as exc:
                ctx.log.add(Rejection(file, "header", str(exc)))
                return
            header_size = len(fields)
            width_in_rows = "width" in columns
            continue
        name = ""
        try:
            if len(fields) != header_size:
                raise ValueError(f"wrong column count: expected {header_size} fields, "
                                 f"got {len(fields)}")
            name = fields[columns["image"]].strip()
            if not name:
                raise ValueError("missing value: no image name")
            image = images.get(name)
            if image is None:
                image = images[name] = _new_image(name, number, csv_path, ctx,
                                                  need_size=not normalized and not width_in_rows)
            if image.error:
                image.ignored_rows += 1
                continue
            if width_in_rows:
                size = checked_size(_float(fields, columns, "width"),
                                    _float(fields, columns, "height"))
                if image.width is None:
                    image.width, image.height = size
                    image.size_line = number
                elif size != (image.width, image.height):
                    image.error, image.error_line = (
                        f"conflicting size: {size[0]:g}x{size[1]:g} at line {number}, "
                        f"{image.width:g}x{image.height:g} at line {image.size_line}"), number
                    continue
            label = fields[columns["label"]]
            raw = [fields[columns[c]] for c in ("xmin", "ymin", "xmax", "ymax")]
            if not label.strip() and not any(r.strip() for r in raw):
                continue  # an image without objects
            coords = [_float(fields, columns, c) for c in ("xmin", "ymin", "xmax", "ymax")]
            if normalized:
                box = checked_box(label, *coords)
            else:
                assert image.width is not None and image.height is not None
                box = normalized_box(label, *coords, image.width, image.height)
            image.boxes.append(box)
        except ValueError as exc:
            ctx.log.add(Rejection(file, where, str(exc)))
            if name and name in images:
                images[name].refused += 1
    if columns is None:
        ctx.log.add(Rejection(file, "header", "empty file: no header line"))
        return
    for image in images.values():
        record = f"image {image.name}"
        if image.error:
            later = f" ({image.ignored_rows} more rows of it ignored)" if image.ignored_rows else ""
            ctx.log.add(Rejection(file, f"line {image.error_line}: {record}",
                                  f"{image.error}{later}"))
            continue
        if image.refused and not image.boxes:
            ctx.log.add(Rejection(file, f"line {image.line}: {record}",
                                  f"no usable box: image dropped, all {image.refused} rows "
                                  f"refused"))
            continue
        assert image.source is not None
        yield ImageRecord(
            key=image.key,
            source=image.source,
            source_id=image.name,
            width=None if image.width is None else int(image.width),
            height=None if image.height is None else int(image.height),
            boxes=tuple(image.boxes),
            provenance={"format": "csv", "file": file, "line": image.line},
        )


def parse(files: list[Path], ctx: ParseContext) -> Iterator[ImageRecord]:
    """Parse the CSV files of one export, each on its own."""
    from odapi_operators.core.data.formats import parse_each

    return parse_each(files, ctx, parse_csv_file)