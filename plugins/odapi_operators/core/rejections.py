"""Errors as values: every record we refuse is reported as (file, record, reason).

A stage collects `Rejection`s in a `RejectionLog` instead of raising, so one bad record never
stops the good ones; the log is written as JSON lines next to the stage's outputs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from odapi_operators.core import storage
from odapi_operators.core.failures import Failure


@dataclass(frozen=True)
class Rejection:
    file: str
    record: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file} [{self.record}]: {self.reason}"


class RecordError(ValueError):
    """Raised by a parser or check for one record; becomes a `Rejection`."""

    def __init__(self, file: str, record: str, reason: str):
        super().__init__(f"{file} [{record}]: {reason}")
        self.rejection = Rejection(str(file), str(record), reason)


class StageError(RuntimeError):
    """A stage cannot produce any usable output; the message says why and where the report is.

    Bad data by default (a retry fails the same way); `failure=Failure.TRANSIENT` where the
    cause may pass (a full disk, a host that is down)."""

    def __init__(self, message: str, failure: Failure = Failure.DATA):
        super().__init__(message)
        self.failure = failure


class RejectionLog:
    def __init__(self) -> None:
        self.items: list[Rejection] = []

    def add(self, rejection: Rejection) -> None:
        self.items.append(rejection)

    def __len__(self) -> int:
        return len(self.items)

    def by_reason(self) -> dict[str, int]:
        """Counts per reason, with record-specific detail after ':' folded away."""
        return dict(Counter(r.reason.split(":", 1)[0] for r in self.items))

    def write(self, path: str | Path) -> None:
        with storage.atomic_write(path, "w") as fh:
            for item in self.items:
                fh.write(json.dumps(asdict(item), sort_keys=True) + "\n")
