"""Which exports each run consumed, so no export trains twice by accident.

A ledger is a JSON-lines file (local, or gs:// through the storage layer); each line records one
export taken by one run: export path, run_id, mode, landed_at, consumed_at and the fingerprint
of the export's listing (names + sizes), so a re-delivered export with other content is new.

Rules: a scheduled or manual run takes the exports not consumed before; a re-run of the same
run_id takes what it took the first time; a backfill run takes the exports that landed in its
data interval [start, end), consumed or not. Claims are atomic (`append_log.AppendLog`):
locally under an fcntl lock, on gs:// as a read-modify-write guarded by the object generation.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Callable, Sequence

from odapi_operators.core.append_log import AppendLog
from odapi_operators.core.data.exports import Export, describe_export
from odapi_operators.core.failures import Failure
from odapi_operators.core.jsonl import parse_json_lines

Decide = Callable[[list[dict]], tuple[list[str], list[dict]]]


class LedgerError(ValueError):
    """The ledger cannot be used; the message names the file, the line and the reason."""
    failure = Failure.DATA


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


def _parse(text: str, path: str) -> list[dict]:
    try:
        records = parse_json_lines(text, path)
    except ValueError as exc:
        raise LedgerError(str(exc)) from None
    for number, record in enumerate(records, 1):
        if not {"export", "run_id", "fingerprint"} <= set(record):
            raise LedgerError(f"{path}: record {number} needs 'export', 'run_id' and "
                              "'fingerprint'")
    return records


def _taken(records: list[dict], run_id: str) -> list[str]:
    return [r["export"] for r in records if r["run_id"] == run_id]


class Ledger:
    """The ledger at `path`; every claim reads it whole, decides, and appends atomically."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.log = AppendLog(self.path, _parse)

    def records(self) -> list[dict]:
        return self.log.records()

    def taken_by(self, run_id: str) -> list[str]:
        """What `run_id` claimed (a run's records are written in one go, so this is final)."""
        return _taken(self.records(), run_id)

    def claim(self, run_id: str, candidates: Sequence[Export]) -> list[str]:
        """Paths for a scheduled/manual run: the unconsumed candidates (recorded as taken).

        A run_id seen before gets what it took then, whatever the candidates are now; a claim
        that took nothing records nothing, so a later re-run may still take new exports.
        """
        def decide(records: list[dict]) -> tuple[list[str], list[dict]]:
            consumed = {(r["export"], r["fingerprint"]) for r in records}
            fresh = [e for e in candidates if (e.path, e.fingerprint) not in consumed]
            return [e.path for e in fresh], self._new(run_id, "claim", fresh)

        return self._transaction(run_id, decide)

    def claim_interval(self, run_id: str, candidates: Sequence[Export], start: datetime,
                       end: datetime) -> list[str]:
        """Paths for a backfill run: candidates that landed in [start, end), consumed or not."""
        if end <= start:
            raise LedgerError(f"{self.path}: run {run_id} has an empty interval [{start}, {end})"
                              " (a CronTriggerTimetable without interval=?)")
        lo, hi = start.timestamp(), end.timestamp()

        def decide(records: list[dict]) -> tuple[list[str], list[dict]]:
            landed = [e for e in candidates if lo <= e.landed_at < hi]
            return [e.path for e in landed], self._new(run_id, "backfill", landed)

        return self._transaction(run_id, decide)

    def claim_all(self, run_id: str, candidates: Sequence[Export]) -> list[str]:
        """Paths for a run asked to retrain on everything: all candidates, consumed or not."""
        return self._transaction(run_id, lambda records: (
            [e.path for e in candidates], self._new(run_id, "all", candidates)))

    @staticmethod
    def _new(run_id: str, mode: str, exports: Sequence[Export]) -> list[dict]:
        now = datetime.now(timezone.utc).isoformat()
        return [{"export": e.path, "run_id": run_id, "mode": mode, "landed_at": _iso(e.landed_at),
                 "consumed_at": now, "fingerprint": e.fingerprint} for e in exports]

    def _transaction(self, run_id: str, decide: Decide) -> list[str]:
        def with_rerun(records: list[dict]) -> tuple[list[str], list[dict]]:
            before = _taken(records, run_id)
            return (before, []) if before else decide(records)

        return self.log.transaction(with_rerun)


def select_exports(ledger_path: str | os.PathLike[str], run_id: str,
                   candidates: Sequence[str | Export],
                   interval: tuple[datetime, datetime] | None = None,
                   marker: str | None = None, take_all: bool = False) -> list[str]:
    """The exports run `run_id` should train on, recorded in the ledger (one call for a DAG).

    `candidates` are export paths (e.g. the sensor's XCom) or Exports; pass `interval`
    (data_interval_start, data_interval_end) for a backfill run only, and the config's
    `exports.marker` so landing times come from the marker file. `take_all` takes every
    candidate, consumed before or not (a manual "retrain on everything").
    """
    ledger = Ledger(ledger_path)
    if before := ledger.taken_by(run_id):  # a re-run: its exports may be gone by now
        return before
    exports = [c if isinstance(c, Export) else describe_export(c, marker) for c in candidates]
    if take_all:
        return ledger.claim_all(run_id, exports)
    if interval is None:
        return ledger.claim(run_id, exports)
    return ledger.claim_interval(run_id, exports, *interval)
