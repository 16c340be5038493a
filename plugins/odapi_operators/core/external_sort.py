"""Sorting and keeping more items than fit in memory: sorted runs on disk, merged with heapq.

`ExternalSorter` holds items in memory until their estimated size (`weight`, in bytes: e.g.
300 a record plus 250 a box) reaches `max_bytes`, then sorts them and spills them as one run
to an anonymous temporary file; iterating merges the runs (`heapq.merge`, stable: equal keys
come out in the order they were added). `Spool` keeps items in the order given, in memory up
to `max_bytes`, then in one such file. Input that never reaches `max_bytes` never touches the
disk, so small inputs cost what a `sorted()` list costs. Peak memory is about `max_bytes` per
sorter or spool being filled, whatever the total.

Items go to disk through `encode` (to something `pickle` writes fast: tuples of plain
values) and come back through `decode`. Run files are unlinked when created (`TemporaryFile`):
nothing is left behind, even by a killed process.
"""

from __future__ import annotations

import heapq
import io
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# Estimated bytes of Python objects held before a run is spilled: an ingest of up to ~250k
# boxes never touches the disk (as fast as sorting in memory); at 15M boxes a few sorters and
# spools at once stay well under 1 GB (bench/ingest_openimages.py). Tests lower it to
# exercise the on-disk path.
MAX_BYTES = 128 << 20
BLOCK = 1024  # items pickled together: one pickle call per block, not per item


def _same(item: Any) -> Any:
    return item


class _PositionalReader(io.RawIOBase):
    """Reads a file descriptor from its own offset (pread): several readers of one run
    never move each other's position."""

    def __init__(self, fd: int, end: int):
        self.fd, self.position, self.end = fd, 0, end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self.fd, min(len(buffer), self.end - self.position), self.position)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


class _Run:
    """One anonymous temporary file of pickled blocks of encoded items: appended to, then
    read back as often as needed."""

    def __init__(self, encode: Callable[[Any], Any]):
        self.encode = encode
        self.file = tempfile.TemporaryFile(prefix="odapi-run-")
        self.block: list[Any] = []

    def append(self, item: Any) -> None:
        self.block.append(self.encode(item))
        if len(self.block) == BLOCK:
            self.flush()

    def flush(self) -> None:
        if self.block:
            pickle.dump(self.block, self.file, pickle.HIGHEST_PROTOCOL)
            self.block = []
        self.file.flush()

    def read(self, decode: Callable[[Any], Any]) -> Iterator[Any]:
        """The items in the order written."""
        self.flush()
        end = self.file.tell()
        with io.BufferedReader(_PositionalReader(self.file.fileno(), end), 1 << 16) as handle:
            while True:
                try:
                    block = pickle.load(handle)
                except EOFError:
                    return
                for encoded in block:
                    yield decode(encoded)

    def close(self) -> None:
        self.file.close()


class Spool(Generic[T]):
    """Items in the order appended, re-iterable; in memory up to `max_bytes`, else on disk."""

    def __init__(self, encode: Callable[[T], Any] = _same, decode: Callable[[Any], T] = _same,
                 weight: Callable[[T], int] = sys.getsizeof,
                 max_bytes: int | None = None):
        self.encode, self.decode, self.weight = encode, decode, weight
        self.max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        self.items: list[T] = []
        self.held = 0
        self.count = 0
        self.run: _Run | None = None

    def append(self, item: T) -> None:
        self.count += 1
        if self.run is not None:
            self.run.append(item)
            return
        self.items.append(item)
        self.held += self.weight(item)
        if self.held > self.max_bytes:
            self.run = _Run(self.encode)
            for held in self.items:
                self.run.append(held)
            self.items, self.held = [], 0

    def __iter__(self) -> Iterator[T]:
        return iter(self.items) if self.run is None else self.run.read(self.decode)

    def __len__(self) -> int:
        return self.count

    @property
    def on_disk(self) -> bool:
        return self.run is not None

    def close(self) -> None:
        if self.run is not None:
            self.run.close()
        self.items = []


class ExternalSorter(Generic[T]):
    """Items sorted by `key` (stable), however many: see the module docstring."""

    def __init__(self, key: Callable[[T], Any], encode: Callable[[T], Any] = _same,
                 decode: Callable[[Any], T] = _same, weight: Callable[[T], int] = sys.getsizeof,
                 max_bytes: int | None = None):
        self.key, self.encode, self.decode, self.weight = key, encode, decode, weight
        self.max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        self.buffer: list[T] = []
        self.held = 0
        self.count = 0
        self.runs: list[_Run] = []

    def add(self, item: T) -> None:
        self.buffer.append(item)
        self.count += 1
        self.held += self.weight(item)
        if self.held >= self.max_bytes:
            self.spill()

    def extend(self, items: Iterable[T]) -> ExternalSorter[T]:
        for item in items:
            self.add(item)
        return self

    def spill(self) -> None:
        """Write what is held as one sorted run (nothing if nothing is held)."""
        if self.buffer:
            self.buffer.sort(key=self.key)
            run = _Run(self.encode)
            for item in self.buffer:
                run.append(item)
            run.flush()
            self.runs.append(run)
            self.buffer, self.held = [], 0

    def settle(self) -> None:
        """Once every item is added: spill the rest too if runs are on disk already, so a
        large sorter waiting for its turn holds no memory."""
        if self.runs:
            self.spill()

    def __iter__(self) -> Iterator[T]:
        self.buffer.sort(key=self.key)
        if not self.runs:
            return iter(self.buffer)
        streams = [run.read(self.decode) for run in self.runs]
        return heapq.merge(*streams, iter(self.buffer), key=self.key)

    def __len__(self) -> int:
        return self.count

    @property
    def on_disk(self) -> bool:
        return bool(self.runs)

    def close(self) -> None:
        for run in self.runs:
            run.close()
        self.runs, self.buffer = [], []
