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
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from odapi_operators.core.paths import resolve_inside
from odapi_operators.core.report import RejectionLog

FORMAT_MODULES = ("voc",)


@dataclass(frozen=True)
class ParseContext:
    export_root: Path
    images_root: Path | None
    log: RejectionLog

    def resolve_image(self, name: str, relative_to: Path | None = None) -> Path:
        """Image `name` inside images_root, else inside `relative_to` (default: the export)."""
        return resolve_inside(self.images_root or relative_to or self.export_root, name)

    def key_root(self, fallback: Path) -> Path:
        return Path(self.images_root or self.export_root or fallback).resolve()


def load(name: str) -> ModuleType:
    if name not in FORMAT_MODULES:
        raise ValueError(f"unknown format {name!r}; expected auto or one of "
                         f"{', '.join(FORMAT_MODULES)}")
    return importlib.import_module(f"odapi_operators.core.formats.{name}")


def detect(path: Path, head: bytes) -> str | None:
    """The first format whose sniffer claims `path`, or None."""
    for name in FORMAT_MODULES:
        module = load(name)
        if path.suffix.lower() in module.SUFFIXES and module.sniff(path, head):
            return name
    return None
