"""One image's `tf.train.Example`, and the Examples earlier layouts wrote, reused by content.

A dataset version that adds 5% of images still changes every shard: records go round-robin
in manifest order, so each insertion moves the records after it, and each record's
`image/source_id` is its position in the manifest. What does not change is the rest of an
unchanged image's Example, and that is most of the work (reading and hashing the image,
encoding the features). So every shard lists where each of its Examples is
(`.shard-stats/<shard>.examples`, a line per Example in manifest order: key, identity,
offset, size, source id), and a later layout takes an unchanged image's Example from the
shards of the layout the records cache published last (`<cache>/latest`), with the new
source id spliced in: the bytes are exactly what `example_for` would write, so the shards of
a version are the same whatever was reused.

An Example is reused only under the same identity (the image's sha256 from upstream, its
file name, size, boxes and their label ids) and when its record's checksums hold; anything
else (no list, a lost or damaged shard, another identity) is encoded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import os
from operator import itemgetter
from pathlib import Path
from typing import IO, Iterator

from odapi_operators.core.data.manifest import ImageRecord
from odapi_operators.core.data.tfrecord import (
    MAX_RECORD_BYTES,
    bytes_feature,
    encode_example,
    example_entries,
    example_of,
    feature_entry,
    float_feature,
    int64_feature,
    read_record_at,
)
from odapi_operators.core.layout import SUMMARY

STATS_DIR = ".shard-stats"  # a records folder's stats and lists, a file of each per shard
LATEST = "latest"  # in the records cache: the fingerprint of the layout published last
FORMAT = 1  # part of every identity: bump it when example_for writes other bytes


def example_for(record: ImageRecord, source_id: int, label_map: dict[str, int]) -> bytes:
    """Serialized tf.train.Example for one verified image record."""
    encoded = Path(record.source.uri).read_bytes()
    fmt = b"png" if encoded[:8] == b"\x89PNG\r\n\x1a\n" else b"jpeg"
    width, height = int(record.width), int(record.height)
    boxes = record.boxes
    try:
        labels = [label_map[b.label] for b in boxes]
    except KeyError as exc:
        raise ValueError(f"{record.key}: class {exc} is not in the label map") from None
    return encode_example({
        "image/encoded": bytes_feature([encoded]),
        "image/format": bytes_feature([fmt]),
        "image/filename": bytes_feature([record.source_id.encode()]),
        "image/source_id": bytes_feature([str(source_id).encode()]),
        "image/key/sha256": bytes_feature([hashlib.sha256(encoded).hexdigest().encode()]),
        "image/height": int64_feature([height]),
        "image/width": int64_feature([width]),
        "image/object/bbox/xmin": float_feature([b.xmin for b in boxes]),
        "image/object/bbox/xmax": float_feature([b.xmax for b in boxes]),
        "image/object/bbox/ymin": float_feature([b.ymin for b in boxes]),
        "image/object/bbox/ymax": float_feature([b.ymax for b in boxes]),
        "image/object/class/text": bytes_feature([b.label.encode() for b in boxes]),
        "image/object/class/label": int64_feature(labels),
        "image/object/area": float_feature(
            [(b.xmax - b.xmin) * width * (b.ymax - b.ymin) * height for b in boxes]),
        "image/object/is_crowd": int64_feature([0] * len(boxes)),
    })


def _last_entries(source_id: int, width: int) -> bytes:
    """The two entries that end every Example of `example_for` (keys in order: ...,
    image/source_id, image/width)."""
    return (feature_entry("image/source_id", bytes_feature([str(source_id).encode()]))
            + feature_entry("image/width", int64_feature([width])))


def renumbered(example: bytes, old: int, new: int, width: int) -> bytes | None:
    """`example` (written by `example_for` with source id `old`) with source id `new`;
    None if it does not end as such an Example does."""
    if old == new:
        return example
    try:
        entries = example_entries(example)
    except ValueError:
        return None
    tail = _last_entries(old, width)
    if len(entries) <= len(tail) or entries[-len(tail):] != tail:
        return None
    return example_of(b"".join((entries[:-len(tail)], _last_entries(new, width))))


def identity(record: ImageRecord, label_map: dict[str, int]) -> str | None:
    """What makes two records' Examples the same but for the source id; None when the
    record's bytes are not known by their hash (no upstream sha256) or a class is unmapped."""
    sha = record.provenance.get("sha256")
    if not sha or record.width is None or record.height is None:
        return None
    try:
        labels = [label_map[b.label] for b in record.boxes]
    except KeyError:
        return None
    text = repr((FORMAT, sha, record.source_id, int(record.width), int(record.height),
                 [(b.label, b.xmin, b.ymin, b.xmax, b.ymax) for b in record.boxes], labels))
    return hashlib.sha256(text.encode()).hexdigest()[:32]  # repr: exact for floats, and fast


def list_line(key: str, ident: str | None, offset: int, size: int, source_id: int) -> str:
    """One line of a shard's list: where the Example of `key` is in that shard."""
    return f'[{json.dumps(key)}, {json.dumps(ident)}, {offset}, {size}, {source_id}]\n'


def list_path(folder: Path, shard: str) -> Path:
    """Where a shard's list is: written with the shard, before its stats."""
    return folder / STATS_DIR / f"{shard}.examples"


def latest(cache: str | Path | None) -> str | None:
    """The records folder in `cache` whose Examples a new layout may reuse, if any."""
    if not cache:
        return None
    try:
        name = (Path(cache) / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    folder = Path(cache) / name
    if not name or name != os.path.basename(name) or not (folder / SUMMARY).is_file():
        return None
    return str(folder)


class EarlierExamples:
    """The Examples of `shards` in one earlier records folder, looked up by walking their lists
    (merged by image key) alongside a manifest (in key order too: a manifest in another
    order only finds fewer). A shard without a list, or with a damaged one, offers less."""

    def __init__(self, folder: str | Path, shards: list[str]):
        self.folder = Path(folder)
        self.files: dict[str, IO[str]] = {}
        self.fds: dict[str, int] = {}
        self.reused = 0
        for name in shards:
            with contextlib.suppress(OSError):
                self.files[name] = open(list_path(self.folder, name), encoding="utf-8")
        self.entries = heapq.merge(*[_entries(lines, name) for name, lines in
                                     self.files.items()], key=itemgetter(0))
        self.entry: tuple | None = None
        self._advance()

    def _advance(self) -> None:
        self.entry = next(self.entries, None)

    def example(self, record: ImageRecord, ident: str | None, source_id: int) -> bytes | None:
        """The Example of `record` with `source_id`, if the earlier folder holds it intact."""
        while self.entry is not None and self.entry[0] < record.key:
            self._advance()
        if ident is None or self.entry is None or self.entry[0] != record.key \
                or self.entry[1] != ident:
            return None
        _, _, offset, size, old, shard = self.entry
        try:
            fd = self.fds.get(shard)
            if fd is None:
                fd = self.fds[shard] = os.open(self.folder / shard, os.O_RDONLY)
            data = read_record_at(fd, offset, size)
        except OSError:
            return None
        example = renumbered(data, old, source_id, int(record.width)) if data else None
        self.reused += example is not None
        return example

    def close(self) -> None:
        for lines in self.files.values():
            lines.close()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _entries(lines: IO[str], shard: str) -> Iterator[tuple]:
    """(key, identity, offset, size, source id, shard) per line of a shard's list, up to the
    first line this module did not write whole."""
    for line in lines:
        try:
            key, ident, offset, size, source_id = json.loads(line)
        except (ValueError, TypeError):
            return
        if not (isinstance(key, str) and isinstance(offset, int) and isinstance(size, int)
                and isinstance(source_id, int) and offset >= 0
                and 0 < size <= MAX_RECORD_BYTES):
            return
        yield key, ident, offset, size, source_id, shard
