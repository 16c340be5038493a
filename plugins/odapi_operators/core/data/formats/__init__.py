"""Annotation export parsers, one module per format, all yielding canonical `ImageRecord`s.

A format module defines:

    NAME: str                                   the --format name
    SUFFIXES: tuple[str, ...]                   file endings it may read (".xml", ...)
    NAME_PATTERN: re.Pattern (optional)         file names it may read beyond SUFFIXES
                                                (sharded `x.record-00000-of-00010`)
    sniff(path: Path, head: bytes) -> bool      True if the file looks like this format
    parse(files: list[Path], ctx: ParseContext) -> Iterator[ImageRecord]
    companion_note(path, head) -> str | None   optional: why a file of this format's
                                                exports is not read (noted, not rejected)

`parse` gets every file of one export that the format claimed (companion files such as
Open Images' class descriptions arrive together), reports bad files/lines/boxes to
`ctx.log` and keeps going. Image paths named inside annotations resolve with
`ctx.resolve_image`, which never leaves the allowed roots.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator

from odapi_operators.core.data.manifest import ImageSource, key_from_path, key_from_url
from odapi_operators.core.data.paths import resolve_inside
from odapi_operators.core.rejections import RecordError, RejectionLog

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
REMOTE_KINDS = {"http": "url", "https": "url", "gs": "gs"}


def remote_kind(name: str) -> str | None:
    """'url' or 'gs' for a remote image reference, None for a path; ValueError otherwise."""
    scheme = _SCHEME.match(name)
    if not scheme:
        return None
    kind = REMOTE_KINDS.get(scheme.group(1).lower())
    if kind is None:
        raise ValueError(f"unsupported image location: {name[:200]}")
    return kind

# Detection order matters where formats share a file ending.
FORMAT_MODULES = ("cvat", "voc", "coco", "labelstudio", "prodigy", "openimages", "csv",
                  "yolo", "tfrecord")
_MODULE_NAMES = {"csv": "csvboxes"}  # a module named csv would shadow the stdlib's


def _module_path(name: str) -> str:
    return f"odapi_operators.core.data.formats.{_MODULE_NAMES.get(name, name)}"


AVAILABLE = tuple(n for n in FORMAT_MODULES if importlib.util.find_spec(_module_path(n)))


@dataclass(frozen=True)
class ParseContext:
    """What a parser may use: roots to resolve images in, where to report, its options.

    `inline_dir` is where images embedded in an export (base64 data URIs) are written, by
    content hash, so the manifest references a file instead of carrying megabytes of text.
    `options` holds format options (e.g. {"csv_columns": {...}, "classes": [...]}).
    `notes` counts what was parsed as the options asked rather than rejected (group boxes
    kept or skipped), for the ingest summary.
    """

    export_root: Path
    images_root: Path | None
    log: RejectionLog
    inline_dir: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    notes: Counter[str] = field(default_factory=Counter)

    def resolve_image(self, name: str, relative_to: Path | None = None) -> Path:
        """Image `name` inside images_root, else inside `relative_to` (default: the export)."""
        return resolve_inside(self.images_root or relative_to or self.export_root, name)

    def image_key(self, image_path: Path, folder: Path) -> str:
        """Key from the image path relative to the images (else export) root, else `folder`.

        So the same image named by two exports of different formats gets the same key.
        """
        key_root = Path(self.images_root or self.export_root or folder).resolve()
        if key_root not in image_path.parents:
            key_root = Path(folder).resolve()
        return key_from_path(str(image_path.relative_to(key_root)))

    def locate(self, name: object, folder: Path, file: str,
               record: str) -> tuple[str, ImageSource]:
        """(key, source) for an image named in an export; raises `RecordError` if refused.

        http(s) and gs:// are remote sources; other schemes and data URIs are refused here;
        anything else is a path that must stay inside the images root (else `folder`).
        """
        if not isinstance(name, str) or not name.strip():
            raise RecordError(file, record, f"no image: image reference is {name!r}")
        name = name.strip()
        try:
            kind = remote_kind(name)
        except ValueError as exc:
            raise RecordError(file, record, str(exc)) from None
        if kind:
            return key_from_url(name), ImageSource(kind, name)
        if name.startswith("data:"):
            raise RecordError(file, record, f"unsupported image location: inline {name[:40]}...")
        try:
            path = self.resolve_image(name, relative_to=folder)
        except ValueError as exc:
            raise RecordError(file, record, str(exc)) from None
        return self.image_key(path, folder), ImageSource("local", str(path))


def parse_each(files: list[Path], ctx: ParseContext,
               parse_file: Callable[[Path, ParseContext], Iterable[Any]]) -> Iterator[Any]:
    """Records of every file; a bad or unreadable file is reported and the next one goes on."""
    for path in files:
        try:
            yield from parse_file(Path(path), ctx)
        except RecordError as exc:
            ctx.log.add(exc.rejection)
        except OSError as exc:
            ctx.log.add(RecordError(str(path), "file", f"unreadable file: {exc}").rejection)


def load(name: str) -> ModuleType:
    if name not in AVAILABLE:
        raise ValueError(f"unknown format {name!r}; expected auto or one of "
                         f"{', '.join(AVAILABLE)}")
    return importlib.import_module(_module_path(name))


def may_read(module: ModuleType, path: Path) -> bool:
    """True if `module` reads files named like `path` (its SUFFIXES or NAME_PATTERN)."""
    pattern = getattr(module, "NAME_PATTERN", None)
    return path.suffix.lower() in module.SUFFIXES or bool(pattern and pattern.search(path.name))


def detect(path: Path, head: bytes) -> str | None:
    """The first format whose sniffer claims `path`, or None."""
    for name in AVAILABLE:
        module = load(name)
        if may_read(module, path) and module.sniff(path, head):
            return name
    return None
