"""CVAT for images 1.1 XML.

    <annotations><version>1.1</version><meta>...</meta>
      <image id="0" name="sub/0001.jpg" width="640" height="480">
        <box label="car" occluded="0" xtl="10" ytl="20" xbr="110" ybr="220" z_order="0"
             rotation="30.0"/>
        <polygon label="car" points="1,2;3,4;5,6"/>
      </image>
    </annotations>

A *project* export (several tasks, each in a subset) marks each image with its subset,
`<image id="3" name="0001.jpg" subset="Train" ...>`, and stores the images under
`images/<subset>/`: the same name may be in several subsets as different images. The image is
looked up there (then `<subset>/`, then as named), so each subset's image keeps its own key.

Coordinates are pixels. `rotation` (degrees clockwise, about the box centre, as CVAT rotates)
becomes the axis-aligned envelope of the rotated box: the envelope's corners may stick out of
the image where the rotated box's corners do, so it is clipped to the image after checking
that the box centre lies inside the image (with `boxes.CLIP_TOLERANCE`); the clipped envelope
then goes through `normalized_box` like any other box.

Shapes that are not boxes (polygon, polyline, points, ellipse, cuboid, mask, skeleton, tag)
and CVAT-for-video `<track>`s are reported as "not a box: <shape>", never silently dropped.
An image whose shapes were all refused is dropped ("no usable box"): keeping it with no boxes
would teach the model that its objects are background. An image with no shapes at all is kept
as a negative example, as in the VOC parser.

The XML is read with defusedxml's iterparse (no entities, no external references), one
`<image>` at a time, cleared once parsed. A document is all or nothing: records and rejections
of a file are only handed over once the whole file parsed, so a truncated export is reported
once instead of being half ingested.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from odapi_operators.core.data.boxes import CLIP_TOLERANCE, checked_size, normalized_box
from odapi_operators.core.data.formats.common import no_usable_box
from odapi_operators.core.data.manifest import Box, ImageRecord, ImageSource
from odapi_operators.core.rejections import RecordError, Rejection

if TYPE_CHECKING:
    from odapi_operators.core.data.formats import ParseContext

NAME = "cvat"
SUFFIXES = (".xml",)

NOT_BOXES = ("polygon", "polyline", "points", "ellipse", "cuboid", "mask", "skeleton", "tag")


def sniff(path: Path, head: bytes) -> bool:
    return b"<annotations" in head


def _number(element: Element, name: str, file: str, record: str) -> float:
    raw = element.get(name)
    if raw is None or not raw.strip():
        raise RecordError(file, record, f"missing attribute: {name}")
    try:
        return float(raw)
    except ValueError:
        raise RecordError(file, record, f"not a number: {name} is {raw!r}") from None


def rotated_envelope(xtl: float, ytl: float, xbr: float, ybr: float,
                     degrees: float) -> tuple[float, float, float, float]:
    """Axis-aligned envelope of the box rotated by `degrees` about its centre.

    Quarter turns are computed exactly (no cos(pi/2) = 6e-17 residue).
    """
    cx, cy = (xtl + xbr) / 2, (ytl + ybr) / 2
    half_w, half_h = (xbr - xtl) / 2, (ybr - ytl) / 2
    turn = degrees % 180
    if turn == 0:
        ew, eh = half_w, half_h
    elif turn == 90:
        ew, eh = half_h, half_w
    else:
        c, s = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
        ew, eh = half_w * c + half_h * s, half_w * s + half_h * c
    return cx - ew, cy - eh, cx + ew, cy + eh


def _image_path(name: str, subset: str, folder: Path, ctx: ParseContext, file: str,
                record: str) -> Path:
    """The image file of `name`: in its subset's folder for a project export (the first of
    images/<subset>/, <subset>/ or as named that exists; else images/<subset>/, which the
    missing-image report then names), as named otherwise."""
    names = [f"images/{subset}/{name}", f"{subset}/{name}", name] if subset else [name]
    try:
        places = [ctx.resolve_image(n, relative_to=folder) for n in names]
    except ValueError as exc:
        raise RecordError(file, record, str(exc)) from None
    return next((p for p in places if p.is_file()), places[0])


def _box(element: Element, width: float, height: float, file: str, record: str) -> Box:
    label = element.get("label") or ""
    xtl, ytl, xbr, ybr = (_number(element, c, file, record) for c in ("xtl", "ytl", "xbr", "ybr"))
    rotation = 0.0
    if element.get("rotation", "").strip():
        rotation = _number(element, "rotation", file, record)
    try:
        if rotation % 360 == 0:
            return normalized_box(label, xtl, ytl, xbr, ybr, width, height)
        if not all(math.isfinite(c) for c in (xtl, ytl, xbr, ybr, rotation)):
            raise ValueError(f"non-finite coordinates: {(xtl, ytl, xbr, ybr)} "
                             f"rotation {rotation}")
        if xbr <= xtl or ybr <= ytl:
            raise ValueError(f"degenerate box: {(xtl, ytl, xbr, ybr)}")
        cx, cy = (xtl + xbr) / 2, (ytl + ybr) / 2
        if width > 0 and height > 0 and not (
                -CLIP_TOLERANCE <= cx / width <= 1 + CLIP_TOLERANCE
                and -CLIP_TOLERANCE <= cy / height <= 1 + CLIP_TOLERANCE):
            raise ValueError(f"box outside the image: rotated box centre "
                             f"({cx:g}, {cy:g}) in a {width:g}x{height:g} image")
        x0, y0, x1, y1 = rotated_envelope(xtl, ytl, xbr, ybr, rotation)
        return normalized_box(label, max(x0, 0.0), max(y0, 0.0), min(x1, width),
                              min(y1, height), width, height)
    except ValueError as exc:
        raise RecordError(file, record, str(exc)) from None


def _image_record(element: Element, xml_path: Path, ctx: ParseContext,
                  rejections: list[Rejection]) -> ImageRecord:
    file = str(xml_path)
    image_id = element.get("id", "?")
    record = f"image[id={image_id}]"
    name = (element.get("name") or "").strip()
    if not name:
        raise RecordError(file, record, "missing attribute: name")
    subset = (element.get("subset") or "").strip()
    source_id = f"{subset}/{name}" if subset else name
    record = f"image[id={image_id}{f' subset={subset}' if subset else ''} name={name}]"
    image_path = _image_path(name, subset, xml_path.parent, ctx, file, record)
    width = _number(element, "width", file, record)
    height = _number(element, "height", file, record)
    try:
        width, height = checked_size(width, height)
    except ValueError as exc:
        raise RecordError(file, record, str(exc)) from None
    boxes: list[Box] = []
    refused = 0
    for index, child in enumerate(element):
        where = f"{record}/{child.tag}[{index}]"
        if child.tag != "box":
            refused += 1
            rejections.append(Rejection(file, where, f"not a box: {child.tag}"
                                        + (f" labelled {child.get('label')!r}"
                                           if child.get("label") else "")))
            continue
        try:
            boxes.append(_box(child, width, height, file, where))
        except RecordError as exc:
            refused += 1
            rejections.append(exc.rejection)
    if refused and not boxes:
        raise no_usable_box(file, record, refused, "shapes")
    return ImageRecord(
        key=ctx.image_key(image_path, Path(xml_path).parent),
        source=ImageSource("local", str(image_path)),
        source_id=source_id,
        width=int(width),
        height=int(height),
        boxes=tuple(boxes),
        provenance={"format": "cvat", "file": file, "element": f"image[id={image_id}]"},
    )


def parse_cvat_file(xml_path: Path, ctx: ParseContext
                    ) -> tuple[list[ImageRecord], list[Rejection]]:
    """All records and rejections of one CVAT XML; a broken document raises `RecordError`."""
    file = str(xml_path)
    records: list[ImageRecord] = []
    rejections: list[Rejection] = []
    root: Element | None = None
    depth = 0
    try:
        for event, element in SafeET.iterparse(file, events=("start", "end")):
            if event == "start":
                depth += 1
                if root is None:
                    root = element
                    if root.tag != "annotations":
                        raise RecordError(file, "document", "not a CVAT for images "
                                          f"annotation: root element <{root.tag}>")
                continue
            depth -= 1
            if depth != 1:  # only direct children of <annotations> are handled
                continue
            if element.tag == "image":
                try:
                    records.append(_image_record(element, xml_path, ctx, rejections))
                except RecordError as exc:
                    rejections.append(exc.rejection)
            elif element.tag == "track":
                rejections.append(Rejection(
                    file, f"track[id={element.get('id', '?')}]",
                    "not a box: track (CVAT for video; export as CVAT for images 1.1)"))
            element.clear()
            assert root is not None
            root.remove(element)
    except DefusedXmlException as exc:
        raise RecordError(file, "document", f"forbidden XML construct: {type(exc).__name__} "
                                            f"({exc})") from None
    except SafeET.ParseError as exc:
        dropped = f"; {len(records)} images before the error dropped" if records else ""
        raise RecordError(file, "document", f"not well-formed XML: {exc}{dropped}") from None
    if root is None:
        raise RecordError(file, "document", "not well-formed XML: empty document")
    return records, rejections


def parse(files: list[Path], ctx: ParseContext) -> Iterator[ImageRecord]:
    """Parse the CVAT XMLs of one export; a bad document is reported and skipped whole."""
    for path in files:
        try:
            records, rejections = parse_cvat_file(Path(path), ctx)
        except RecordError as exc:
            ctx.log.add(exc.rejection)
            continue
        for rejection in rejections:
            ctx.log.add(rejection)
        yield from records
