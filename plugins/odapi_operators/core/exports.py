"""Finding complete annotation exports in a watched folder.

An export is a folder of annotation files (and often images). It counts once complete: its
marker file (e.g. `_SUCCESS`, written last by the exporter) exists, or, with no marker
configured, it holds at least one file. The watched path may be one export or a folder of
exports.
"""

from __future__ import annotations

from pathlib import Path


def is_complete(folder: Path, marker: str | None) -> bool:
    if marker:
        return (folder / marker).is_file()
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def find_complete_exports(path: str | Path, marker: str | None) -> list[str]:
    """Complete exports at `path` (itself, or its sub-folders), sorted by name."""
    root = Path(path)
    if not root.is_dir():
        return []
    if is_complete(root, marker) and (marker or not any(p.is_dir() for p in root.iterdir())):
        return [str(root)]
    return [str(p) for p in sorted(root.iterdir()) if p.is_dir() and is_complete(p, marker)]
