"""Images fetched and verified by earlier runs, shared by every run and found by content.

A run's manifest is its whole dataset version (the parent's images plus the new exports'), and
each run has a folder of its own, so the per-run resume indexes of fetch and verify start empty
every time. Without this cache a run that adds 50 images to 10,000 would download and decode
all 10,050 again. With it, only new or changed images are fetched and decoded.

    <cache>/objects/<ab>/<sha256>   image bytes by their sha256 (originals and verify outputs)
    <cache>/sources.jsonl           fetch: source identity -> sha256, size, file suffix
    <cache>/verified.jsonl          verify: (bytes' sha256, rotation, annotated size, options)
                                    -> the verify result

What counts as the same image: for verify, the same bytes under the same options, always.
For fetch, a remote source (URL, gs://) is known by its address and the export's md5 when it
gives one, a local file by its path, size and mtime: an export that puts new bytes at an old
URL without an md5 gets the old bytes (give md5s, or set `images.cache` to null).

Objects are hard links of the runs' files (copies across filesystems); every file in a run
folder and here is only ever replaced whole (an atomic rename), never written in place, so
sharing an inode is safe. The journals are append-only `ResumeIndex` files (a torn last line
is ignored; two runs adding the same entry is harmless); an entry is used only when its object
is there at its size, so a lost object costs a redo, never a wrong image. The cache is an
optimisation: failing to write it never fails a stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from odapi_operators.core import storage
from odapi_operators.core.data.manifest import sorted_json
from odapi_operators.core.data.resume import ResumeIndex

SOURCES, VERIFIED = "sources.jsonl", "verified.jsonl"




def identity(*parts: Any) -> str:
    """A journal key: the hash of what makes two pieces of work the same."""
    return hashlib.sha256(sorted_json(parts).encode()).hexdigest()[:32]


def place(source: str | Path, target: str | Path) -> bool:
    """Put `source`'s bytes at `target` atomically: a hard link, else a copy; False if it
    cannot be done (gone, unreadable, or a full disk).

    A new name is linked at once (a link is atomic: the name appears with the whole file);
    a temporary name and a rename are for replacing a name, or for a copy."""
    try:
        os.link(source, target)
        return True
    except OSError:
        pass  # the name exists, its folder does not, another filesystem, ...: the long way
    target = Path(target)
    tmp = storage.temp_sibling(target)
    try:
        for first in (True, False):
            try:
                os.link(source, tmp)
                break
            except FileNotFoundError:
                if not first or not os.path.exists(source):
                    raise
                tmp.parent.mkdir(parents=True, exist_ok=True)  # the target's folder is new
            except OSError:
                shutil.copyfile(source, tmp)  # another filesystem
                break
        os.replace(tmp, target)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # rename is a no-op when both are links of one file: tmp is left
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


class ImageCache:
    """One cache folder; its journals are opened on first use (fetch needs one, verify the
    other). Not thread-safe: stages call it from their main thread."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.objects = str(self.root / "objects")
        self._journals: dict[str, ResumeIndex | None] = {}

    def object_path(self, sha256: str) -> str:
        return os.path.join(self.objects, sha256[:2], sha256)  # a str: called per image

    def add(self, path: str | Path, sha256: str) -> None:
        """Keep the bytes at `path` (whose sha256 is `sha256`) unless already kept."""
        target = self.object_path(sha256)
        if not os.path.exists(target):
            place(path, target)

    def get(self, journal: str, key: str) -> dict[str, Any] | None:
        index = self._journal(journal)
        return index.get(key) if index else None

    def put(self, journal: str, key: str, entry: dict[str, Any]) -> None:
        index = self._journal(journal)
        if index:
            with contextlib.suppress(OSError):
                index.put({**entry, "key": key})

    def _journal(self, name: str) -> ResumeIndex | None:
        if name not in self._journals:
            try:
                self._journals[name] = ResumeIndex(self.root / name)
            except OSError:
                self._journals[name] = None  # an unusable cache folder: run without it
        return self._journals[name]

    def close(self) -> None:
        for journal in self._journals.values():
            if journal:
                journal.close()
        self._journals.clear()


def open_cache(root: str | Path | None) -> ImageCache | None:
    """The cache at `root`, or None when caching is off (no root) or `root` is remote (its
    objects are hard links of run files, so the cache is a local folder)."""
    if not root or not storage.is_local(root):
        return None
    return ImageCache(root)
