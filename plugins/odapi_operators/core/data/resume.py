"""A stage's memory of finished images, so a killed or repeated run redoes nothing.

One JSON line is appended (and flushed) per finished image, after its file is in place: a
task killed at any moment leaves an index whose every line points at a complete file (a torn
last line is ignored). `compact` rewrites it atomically with one line per image.

A re-run in which every image was already done writes the same outputs again: `outputs_of`
(kept in the stage's summary) and `still_current` let it keep them instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from odapi_operators.core import storage
from odapi_operators.core.data.manifest import sorted_json


class ResumeIndex:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.lines = 0  # lines in the file: more than entries means compact() has work
        if self.path.exists():
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    self.lines += 1
                    try:
                        entry = json.loads(line)
                        self.entries[entry["key"]] = entry
                    except (ValueError, KeyError, TypeError):
                        continue  # a line torn by a kill
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.path, "a", encoding="utf-8")

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, entry: dict[str, Any], flush: bool = True) -> None:
        """Remember `entry`; without `flush` its line may wait in the buffer for the next
        flushed one (or `close`): for work so cheap that redoing it after a kill costs less
        than a write per image."""
        self.entries[entry["key"]] = entry
        self._out.write(sorted_json(entry) + "\n")
        if flush:
            self._out.flush()
        self.lines += 1

    def compact(self, keys: Iterable[str] | None = None) -> None:
        """Keep one line per image (only `keys`, when given); a no-op when nothing changed."""
        wanted = self.entries if keys is None else \
            {k: self.entries[k] for k in keys if k in self.entries}
        if len(wanted) == len(self.entries) == self.lines:
            return
        self._out.close()
        with storage.atomic_write(self.path, "w") as fh:
            for entry in wanted.values():
                fh.write(sorted_json(entry) + "\n")
        self.entries = dict(wanted)
        self.lines = len(wanted)
        self._out = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._out.close()


def sha256_of(path: str | Path) -> str:
    """The sha256 of a local file's bytes (hex), read in blocks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_sha256(path: str | Path) -> str | None:
    """The sha256 of a file's bytes; None if it cannot be read."""
    try:
        return sha256_of(path)
    except OSError:
        return None


def outputs_of(source_sha256: str | None, index: str | Path) -> dict | None:
    """What a stage's outputs were written from: its input (by content) and its index (by
    its file's identity, taken after the index is closed); for a later `still_current`."""
    try:
        st = os.stat(index)
    except OSError:
        return None
    return {"source": source_sha256, "index": [st.st_size, st.st_mtime_ns, st.st_ino]} \
        if source_sha256 else None


def still_current(summary: str | Path, source_sha256: str | None, index: str | Path,
                  outputs: Iterable[str | Path]) -> dict | None:
    """The summary of the run that wrote `outputs` when they hold for this run as they are:
    the same input, an index no run has touched since, every output in place. The caller
    knows nothing changed in this run (every image was already done). None otherwise."""
    try:
        previous = json.loads(Path(summary).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(previous, dict) or previous.get("outputs_of") is None or \
            previous["outputs_of"] != outputs_of(source_sha256, index):
        return None
    return previous if all(os.path.exists(path) for path in outputs) else None
