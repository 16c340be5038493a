"""Small readers the format parsers share: JSON heads, sizes, numbers, CSV lines."""

from __future__ import annotations

import codecs
import csv
import json
import reprlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from odapi_operators.core.data.boxes import checked_size
from odapi_operators.core.rejections import RecordError

if TYPE_CHECKING:
    from odapi_operators.core.data.manifest import ImageRecord
    from odapi_operators.core.rejections import RejectionLog

_LEADING_BYTES = b"\xef\xbb\xbf \t\r\n"  # UTF-8 BOM and whitespace before a JSON value


def json_root_char(head: bytes) -> bytes:
    """First significant byte of a JSON document (`{` or `[` for the formats here)."""
    return head.lstrip(_LEADING_BYTES)[:1]


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 80


def load_json(data: str | bytes, file: str, record: str) -> Any:
    """One JSON document, or a RecordError for `record`: a syntax error, bad UTF-8, a number
    too long to convert or nesting deeper than Python's recursion limit (the C decoder raises
    RecursionError, which would otherwise end the whole ingest) all reject only this record."""
    try:
        return json.loads(data)
    except RecursionError:
        raise RecordError(file, record, "not valid JSON: nested too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise RecordError(file, record, f"not valid JSON: {exc}") from None


def read_json_document(path: str | Path) -> Any:
    """A whole JSON file (UTF-8, BOM allowed); a RecordError for its "document" otherwise."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise RecordError(str(path), "document", f"not valid JSON: {exc}") from None
    return load_json(text, str(path), "document")


def brief(value: Any) -> str:
    """A bounded repr for a rejection reason: a value from an export may be megabytes long or
    nested a thousand deep, and the reason must stay one short, printable line."""
    return _BRIEF.repr(value)


def scalar(value: Any) -> Any:
    """`value` if it is a JSON scalar, else its `brief` repr: what goes into a manifest's
    provenance, so writing it never recurses into a hostile structure."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return brief(value)


def is_number(value: Any) -> bool:
    """An int or float that arithmetic with floats can use (a JSON integer of 400 digits
    overflows float conversion, so it is not one)."""
    if isinstance(value, float):
        return True
    return isinstance(value, int) and not isinstance(value, bool) \
        and -sys.float_info.max <= value <= sys.float_info.max


def parses_as_float(raw: str) -> bool:
    """True for text `float()` accepts: a numeric field of a text format (YOLO, CSV)."""
    try:
        float(raw)
        return True
    except ValueError:
        return False


def image_size(width: Any, height: Any) -> tuple[int, int] | None:
    """(width, height) in whole pixels; None if the export gives neither (size unknown).

    Raises ValueError for a size that is given but unusable (not numbers, fractional, zero,
    beyond `boxes.MAX_IMAGE_SIDE`): that is a defect to report, not an unknown size.
    """
    if width is None and height is None:
        return None
    if not (is_number(width) and is_number(height)):
        raise ValueError(f"invalid image size: width {brief(width)}, height {brief(height)} "
                         "(numbers expected)")
    return checked_size(width, height)


def split_csv_line(line: str) -> list[str]:
    """Fields of one CSV line; raises csv.Error for a stray quote (strict quoting)."""
    if '"' not in line:
        return line.split(",")
    return next(csv.reader((line,), strict=True))


def read_csv_lines(path: str | Path) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """Stream (line number, fields, None) or (line number, None, reason) per non-blank line.

    Reads bytes line by line and decodes each line itself, so a UTF-8 BOM is dropped, a bad
    byte costs one line (not the rest of the file) and memory stays one line. Each line is
    its own record: an unbalanced quote is reported for that line ("stray quote: ...")
    instead of swallowing the lines after it; quoted fields may hold commas, not newlines.
    """
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if number == 1:
                if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                    yield number, None, "not UTF-8 text: UTF-16 file (save it as CSV UTF-8)"
                    return
                if raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield number, None, f"not UTF-8 text: byte {exc.start} ({exc.reason})"
                continue
            if not line.strip():
                continue
            try:
                yield number, split_csv_line(line), None
            except csv.Error as exc:
                kind = "malformed CSV line" if "NUL" in str(exc) else "stray quote"
                yield number, None, f"{kind}: {exc}"


def first_line_fields(head: bytes) -> list[str]:
    """The first line of a file head, BOM stripped, as stripped fields ([] if unreadable)."""
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8):]
    line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")
    try:
        return [f.strip() for f in split_csv_line(line)]
    except csv.Error:
        return []


def no_usable_box(file: str, record: str, refused: int, what: str) -> RecordError:
    """The one rule of every format: an image that had boxes, all refused, is dropped (kept,
    it would teach the model its objects are background); one with none is a negative."""
    return RecordError(file, record, f"no usable box: image dropped, all {refused} {what} "
                                     "refused")


def kept(log: RejectionLog, build: Callable[[], ImageRecord | None]) -> ImageRecord | None:
    """`build()`, or None once its RecordError is logged: one bad record never stops the rest."""
    try:
        return build()
    except RecordError as exc:
        log.add(exc.rejection)
        return None
