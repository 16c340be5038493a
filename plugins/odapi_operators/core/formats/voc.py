"""Pascal VOC XML as labelImg writes it.

labelImg stores the annotator's absolute `<path>`, useless on another machine: the image is
resolved from `<filename>` relative to the annotation's folder (or a given images root),
never outside that root. XML is parsed with defusedxml (no entities, no external fetches).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from odapi_operators.core.boxes import normalized_box
from odapi_operators.core.manifest import ImageRecord, ImageSource
from odapi_operators.core.paths import resolve_inside
from odapi_operators.core.report import RecordError, RejectionLog

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def image_key(relative_path: str) -> str:
    """Stable image key from the image path relative to its export root."""
    stem = relative_path.rsplit(".", 1)[0] if "." in Path(relative_path).name else relative_path
    return _KEY_UNSAFE.sub("_", stem.replace("/", "__")).strip("_")


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


def parse_voc_file(xml_path: str | Path, images_root: str | Path | None,
                   log: RejectionLog, export_root: str | Path | None = None) -> ImageRecord:
    """Parse one labelImg XML; bad boxes are logged, a bad file raises `RecordError`.

    The image key is the image path relative to `images_root` (else `export_root`, else the
    XML's folder), so `day/0001.jpg` and `night/0001.jpg` stay two images.
    """
    file = str(xml_path)
    try:
        root = SafeET.parse(file).getroot()
    except DefusedXmlException as exc:
        raise RecordError(file, "document", f"forbidden XML construct: {type(exc).__name__}")
    except SafeET.ParseError as exc:
        raise RecordError(file, "document", f"not well-formed XML: {exc}") from None
    if root.tag != "annotation":
        raise RecordError(file, "document", f"not a Pascal VOC annotation: root element <{root.tag}>")
    filename = root.findtext("filename") or Path(root.findtext("path") or "").name
    if not filename.strip():
        raise RecordError(file, "document", "missing element: no <filename> or <path>")
    filename = filename.strip()
    base = Path(images_root) if images_root else Path(xml_path).parent
    try:
        image_path = resolve_inside(base, filename)
    except ValueError as exc:
        raise RecordError(file, "filename", str(exc)) from None
    width = _number(root, "size/width", file, "size")
    height = _number(root, "size/height", file, "size")
    boxes = []
    for index, obj in enumerate(root.iter("object")):
        record = f"object[{index}]"
        name = _text(obj, "name", file, record)
        try:
            boxes.append(normalized_box(
                name, *(_number(obj, f"bndbox/{c}", file, record)
                        for c in ("xmin", "ymin", "xmax", "ymax")),
                width, height))
        except RecordError as exc:
            log.add(exc.rejection)
        except ValueError as exc:
            log.add(RecordError(file, record, str(exc)).rejection)
    key_root = Path(images_root or export_root or base).resolve()
    if key_root not in image_path.parents:
        key_root = base.resolve()
    return ImageRecord(
        key=image_key(str(image_path.relative_to(key_root))),
        source=ImageSource("local", str(image_path)),
        source_id=filename,
        width=int(width),
        height=int(height),
        boxes=tuple(boxes),
        provenance={"format": "voc", "file": file, "element": "annotation"},
    )


def parse_voc(paths: list[tuple[str, str]], images_root: str | Path | None,
              log: RejectionLog) -> Iterator[ImageRecord]:
    """Parse (export root, XML path) pairs; a bad file is logged and skipped."""
    for export_root, path in paths:
        try:
            yield parse_voc_file(path, images_root, log, export_root)
        except RecordError as exc:
            log.add(exc.rejection)
