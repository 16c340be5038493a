"""An append-only JSON-lines file, local or on gs://, that concurrent writers share safely.

Every transaction reads the whole file, lets the caller decide what to append, and appends in
one step: locally under an fcntl lock (one O_APPEND write after everything was read), on
gs:// as a read-modify-write guarded by the object generation (retried when another writer
got there first). The exports ledger and the pre-annotation "sent" ledger are both this.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from odapi_operators.core import storage
from odapi_operators.core.jsonl import parse_json_lines

T = TypeVar("T")
Decide = Callable[[list[dict]], tuple[T, list[dict]]]
_GS_ATTEMPTS = 20


def json_lines(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")


class AppendLog:
    """The log at `path`; `parse(text, path)` turns its text into records (and validates)."""

    def __init__(self, path: str | os.PathLike[str],
                 parse: Callable[[str, str], list[dict]] = parse_json_lines) -> None:
        self.path = os.fspath(path)
        self.parse = parse

    def records(self) -> list[dict]:
        try:
            return self.parse(storage.read_text(self.path), self.path)
        except FileNotFoundError:
            return []

    def transaction(self, decide: Decide[T]) -> T:
        """Run `decide(records)` -> (result, records to append) atomically; return result."""
        if storage.is_local(self.path):
            return self._local_transaction(decide)
        return self._object_transaction(decide)

    def _local_transaction(self, decide: Decide[T]) -> T:
        with self._locked() as fd:
            size = os.fstat(fd).st_size
            text = os.pread(fd, size, 0).decode("utf-8") if size else ""
            result, new = decide(self.parse(text, self.path))
            if new:
                os.write(fd, json_lines(new))  # O_APPEND: one write, after everything read
                os.fsync(fd)
        return result

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # also releases the lock

    def _object_transaction(self, decide: Decide[T]) -> T:
        for _ in range(_GS_ATTEMPTS):
            try:
                generation = storage.stat(self.path).generation
                text = storage.read_text(self.path)
            except FileNotFoundError:
                generation, text = 0, ""
            result, new = decide(self.parse(text, self.path))
            if not new:
                return result
            try:
                # Read after stat: if it changed in between, the generation no longer matches.
                storage.write_bytes_if_generation(self.path,
                                                  text.encode("utf-8") + json_lines(new),
                                                  generation)
                return result
            except storage.PreconditionFailed:
                continue
        raise storage.StorageError(f"{self.path}: ledger kept changing; gave up after "
                                   f"{_GS_ATTEMPTS} attempts")
