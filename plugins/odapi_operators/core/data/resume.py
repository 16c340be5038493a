"""A stage's memory of finished images, so a killed or repeated run redoes nothing.

One JSON line is appended (and flushed) per finished image, after its file is in place: a
task killed at any moment leaves an index whose every line points at a complete file (a torn
last line is ignored). `compact` rewrites it atomically with one line per image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from odapi_operators.core import storage


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
        self._out.write(json.dumps(entry, sort_keys=True) + "\n")
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
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
        self.entries = dict(wanted)
        self.lines = len(wanted)
        self._out = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._out.close()
