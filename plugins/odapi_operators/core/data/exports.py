"""Finding complete annotation exports in a watched folder or gs:// prefix.

An export is a folder of annotation files (and often images). The watched path may be one export
or a folder of exports (sub-folders; on gs://, common prefixes). An export is complete when its
marker file (e.g. `_SUCCESS`, written last by the exporter) exists; with no marker configured,
when its listing (names, sizes, generations) has stayed unchanged for `inactivity_seconds`.
Inactivity needs two looks, so `scan_exports` takes the previous snapshot and returns the next;
a sensor or trigger keeps it between pokes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from odapi_operators.core import storage
from odapi_operators.core.storage import FileStat

Snapshot = dict[str, dict]  # export path -> {"state": listing hash, "since": epoch seconds}


@dataclass(frozen=True)
class Export:
    """One export as seen by one listing; small and picklable, so it can cross processes."""

    path: str
    landed_at: float  # marker's mtime, else the newest file's: when the export arrived
    fingerprint: str  # names + sizes: a re-delivery with other content gets a new one
    state: str  # names + sizes + generations: any rewrite changes it


def _digest(items: list) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode("utf-8")).hexdigest()


def make_export(path: str, files: Mapping[str, FileStat], marker: str | None) -> Export:
    """An Export from its files (relative name -> stat); `files` must not be empty."""
    landed = files[marker].mtime if marker and marker in files else max(
        st.mtime for st in files.values())
    names = sorted(files)
    return Export(path=path, landed_at=landed,
                  fingerprint=_digest([[n, files[n].size] for n in names]),
                  state=_digest([[n, files[n].size, files[n].generation] for n in names]))


def _root(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    return text.rstrip("/") if "://" in text else str(Path(text))


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if "://" in root else str(Path(root) / name)


def _relative_listing(root: str) -> dict[str, FileStat]:
    prefix = root + "/"
    return {name[len(prefix):]: st for name, st in storage.list_stats(root).items()
            if name.startswith(prefix)}


def list_exports(path: str | os.PathLike[str], marker: str | None) -> list[Export]:
    """Candidate exports at `path`, sorted by path: with a marker, only those holding it.

    `path` itself is the export if it holds the marker (with no marker: if it holds files and
    no sub-folders); otherwise each sub-folder is one. A missing local path has none; a missing
    bucket is an error.
    """
    root = _root(path)
    files = _relative_listing(root)
    if marker:
        is_export = marker in files
    else:
        is_export = bool(files) and not any("/" in name for name in files)
    groups: dict[str, dict[str, FileStat]] = {root: files} if is_export else {}
    if not is_export:
        for name, st in files.items():
            folder, sep, rest = name.partition("/")
            if sep:
                groups.setdefault(_join(root, folder), {})[rest] = st
    return [make_export(p, fs, marker) for p, fs in sorted(groups.items())
            if not marker or marker in fs]


def describe_export(path: str | os.PathLike[str], marker: str | None = None) -> Export:
    """The Export at exactly `path` (e.g. one that a sensor returned)."""
    root = _root(path)
    files = _relative_listing(root)
    if not files:
        raise FileNotFoundError(f"{root}: no files, so not an export")
    return make_export(root, files, marker)


def scan_exports(path: str | os.PathLike[str], marker: str | None = None,
                 inactivity_seconds: float = 0, previous: Snapshot | None = None,
                 now: float | None = None) -> tuple[list[Export], Snapshot]:
    """Complete exports at `path` and the snapshot to pass in next time.

    With a marker the snapshot is empty (the marker decides). Without one, an export is
    complete once its state has been seen unchanged for `inactivity_seconds`; 0 means as soon
    as it holds a file.
    """
    candidates = list_exports(path, marker)
    if marker:
        return candidates, {}
    now = time.time() if now is None else now
    previous = previous or {}
    snapshot: Snapshot = {}
    complete = []
    for export in candidates:
        seen = previous.get(export.path)
        since = seen["since"] if seen and seen["state"] == export.state else now
        snapshot[export.path] = {"state": export.state, "since": since}
        if now - since >= inactivity_seconds:
            complete.append(export)
    return complete, snapshot


def find_complete_exports(path: str | Path, marker: str | None) -> list[str]:
    """Complete exports at `path` (itself, or its sub-folders), sorted by name."""
    return [export.path for export in scan_exports(path, marker)[0]]
