"""Pascal VOC XML as labelImg writes it.

labelImg stores the annotator's absolute `<path>`, useless on another machine: the image is
resolved from `<filename>` relative to the annotation's folder (or a given images root),
never outside that root. XML is parsed with defusedxml (no entities, no external fetches).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from odapi_operators.core.data.boxes import checked_size, normalized_box
from odapi_operators.core.data.manifest import ImageRecord, ImageSource
from odapi_operators.core.rejections import RecordError

if TYPE_CHECKING:
    from odapi_operators.core.data.formats import ParseContext

NAME = "voc"
SUFFIXES = (".xml",)


def _text(element: Element, path: str, file: str, record: str) -> str:
    found = element.findtext(path)
    if found is None or not found.strip():
        raise RecordError(file, record, f"missing element: <{path}>")
    return found.strip()


def _number(element: Element, path: str, file: str, record: str) -> float:
    raw = _text(element, path, file, record)
    try:
        return float(raw)
    except ValueError:
        raise RecordError(file, record, f"not a number: <{path}> is {raw!r}") from None


def sniff(path: Path, head: bytes) -> bool:
    """Any XML but CVAT's `<annotations>` is offered here; a non-VOC root is then reported."""
    return b"<annotations" not in head


def parse_voc_file(xml_path: Path, ctx: ParseContext) -> ImageRecord:
    """Parse one labelImg XML; bad boxes are logged, a bad file raises `RecordError`.

    The image key is the image path relative to the images root (else the export root), so
    `day/0001.jpg` and `night/0001.jpg` stay two images.
    """
    file = str(xml_path)
    try:
        root = SafeET.parse(file).getroot()
    except DefusedXmlException as exc:
        raise RecordError(file, "document", f"forbidden XML construct: {type(exc).__name__}")
    except SafeET.ParseError as exc:
        raise RecordError(file, "document", f"not well-formed XML: {exc}") from None
    if root.tag != "annotation":
        raise RecordError(file, "document",
                          f"not a Pascal VOC annotation: root element <{root.tag}>")
    filename = root.findtext("filename") or Path(root.findtext("path") or "").name
    if not filename.strip():
        raise RecordError(file, "document", "missing element: no <filename> or <path>")
    filename = filename.strip()
    try:
        image_path = ctx.resolve_image(filename, relative_to=Path(xml_path).parent)
    except ValueError as exc:
        raise RecordError(file, "filename", str(exc)) from None
    width, height = _number(root, "size/width", file, "size"), _number(root, "size/height",
                                                                         file, "size")
    try:
        width, height = checked_size(width, height)
    except ValueError as exc:
        raise RecordError(file, "size", str(exc)) from None
    boxes = []
    objects = list(root.iter("object"))
    for index, obj in enumerate(objects):
        record = f"object[{index}]"
        try:
            name = _text(obj, "name", file, record)
            boxes.append(normalized_box(
                name, *(_number(obj, f"bndbox/{c}", file, record)
                        for c in ("xmin", "ymin", "xmax", "ymax")),
                width, height))
        except RecordError as exc:
            ctx.log.add(exc.rejection)
        except ValueError as exc:
            ctx.log.add(RecordError(file, record, str(exc)).rejection)
    if objects and not boxes:  # keeping it would teach the model its objects are background
        raise RecordError(file, "document",
                          f"no usable box: all {len(objects)} objects rejected")
    return ImageRecord(
        key=ctx.image_key(image_path, Path(xml_path).parent),
        source=ImageSource("local", str(image_path)),
        source_id=filename,
        width=width,
        height=height,
        boxes=tuple(boxes),
        provenance={"format": "voc", "file": file, "element": "annotation"},
    )


def parse(files: list[Path], ctx: ParseContext) -> Iterator[ImageRecord]:
    """Parse many VOC files of one export; a bad file is logged and skipped."""
    from odapi_operators.core.data.formats import parse_each

    return parse_each(files, ctx, lambda path, c: [parse_voc_file(path, c)])