"""Annotation export parsers, one module per format, all yielding canonical `ImageRecord`s.

A format module defines:

    NAME: str                                   the --format name
    SUFFIXES: tuple[str, ...]                   file endings it may read (".xml", ...)
    sniff(path: Path, head: bytes) -> bool      True if the file looks like this format
    parse(files: list[Path], ctx: ParseContext) -> Iterator[ImageRecord]

`parse` gets every file of one export that the format claimed (companion files such as
Open Images' class descriptions arrive together), reports bad files/lines/boxes to
`ctx.log` and keeps going. Image paths named inside annotations resolve with
`ctx.resolve_image`, which never leaves the allowed roots.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from odapi_operators.core.paths import resolve_inside
from odapi_operators.core.report import RejectionLog

# Detection order matters where formats share a file ending.
FORMAT_MODULES = ("cvat", "voc", "coco", "labelstudio", "prodigy", "openimages", "csv")
_MODULE_NAMES = {"csv": "csvboxes"}  # a module named csv would shadow the stdlib's


def _module_path(name: str) -> str:
    return f"odapi_operators.core.formats.{_MODULE_NAMES.get(name, name)}"


AVAILABLE = tuple(n for n in FORMAT_MODULES if importlib.util.find_spec(_module_path(n)))


@dataclass(frozen=True)
class ParseContext:
    """What a parser may use: roots to resolve images in, where to report, its options.

    `inline_dir` is where images embedded in an export (base64 data URIs) are written, by
    content hash, so the manifest references a file instead of carrying megabytes of text.
    `options` holds format options (e.g. {"csv_columns": {...}, "classes": [...]}).
    """

    export_root: Path
    images_root: Path | None
    log: RejectionLog
    inline_dir: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def resolve_image(self, name: str, relative_to: Path | None = None) -> Path:
        """Image `name` inside images_root, else inside `relative_to` (default: the export)."""
        return resolve_inside(self.images_root or relative_to or self.export_root, name)

    def key_root(self, fallback: Path) -> Path:
        return Path(self.images_root or self.export_root or fallback).resolve()


def load(name: str) -> ModuleType:
    if name not in AVAILABLE:
        raise ValueError(f"unknown format {name!r}; expected auto or one of "
                         f"{', '.join(AVAILABLE)}")
    return importlib.import_module(_module_path(name))


def detect(path: Path, head: bytes) -> str | None:
    """The first format whose sniffer claims `path`, or None."""
    for name in AVAILABLE:
        module = load(name)
        if path.suffix.lower() in module.SUFFIXES and module.sniff(path, head):
            return name
    return None
