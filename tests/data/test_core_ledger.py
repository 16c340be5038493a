"""ledger: which run consumed which export (new runs, re-runs, backfills, re-deliveries, races)."""

from __future__ import annotations

import json
import multiprocessing
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from odapi_operators.core.data.exports import list_exports
from odapi_operators.core.data.ledger import Ledger, LedgerError, select_exports

from conftest import join_all

MARKER = "_SUCCESS"
DAY0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _export(root: Path, name: str, landed: datetime | None = None, size: int = 10) -> str:
    """An export folder whose marker (and files) carry the time it `landed`."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ann.xml").write_text("x" * size)
    (folder / MARKER).write_text("")
    if landed is not None:
        for path in folder.iterdir():
            os.utime(path, (landed.timestamp(), landed.timestamp()))
    return str(folder)


def _candidates(root: Path):
    return list_exports(root, MARKER)


def test_new_runs_take_only_unconsumed_exports(tmp_path):
    exports, ledger = tmp_path / "exports", Ledger(tmp_path / "state" / "ledger.jsonl")
    a, b = _export(exports, "a"), _export(exports, "b")
    assert ledger.claim("manual__1", _candidates(exports)) == [a, b]
    c = _export(exports, "c")
    assert ledger.claim("scheduled__2", _candidates(exports)) == [c]
    assert ledger.claim("scheduled__3", _candidates(exports)) == []
    records = ledger.records()
    assert [(r["export"], r["run_id"], r["mode"]) for r in records] == [
        (a, "manual__1", "claim"), (b, "manual__1", "claim"), (c, "scheduled__2", "claim")]
    assert {"landed_at", "consumed_at", "fingerprint"} <= set(records[0])


def test_rerun_takes_the_same_exports_again(tmp_path):
    exports, ledger = tmp_path / "exports", Ledger(tmp_path / "ledger.jsonl")
    a = _export(exports, "a")
    assert ledger.claim("run-1", _candidates(exports)) == [a]
    b = _export(exports, "b")  # arrives before the retry
    assert ledger.claim("run-1", _candidates(exports)) == [a]
    assert ledger.claim("run-1", []) == [a]
    assert ledger.claim("run-2", _candidates(exports)) == [b]
    assert len(ledger.records()) == 2  # re-runs record nothing new


def test_run_that_found_nothing_records_nothing(tmp_path):
    exports, ledger = tmp_path / "exports", Ledger(tmp_path / "ledger.jsonl")
    assert ledger.claim("run-1", []) == []
    a = _export(exports, "a")
    assert ledger.claim("run-1", _candidates(exports)) == [a]


def test_backfill_takes_exports_landed_in_its_interval(tmp_path):
    exports, ledger = tmp_path / "exports", Ledger(tmp_path / "ledger.jsonl")
    day = {i: _export(exports, f"day{i}", landed=DAY0 + timedelta(days=i, hours=12))
           for i in range(5)}
    at_start = _export(exports, "at-start", landed=DAY0 + timedelta(days=2))
    at_end = _export(exports, "at-end", landed=DAY0 + timedelta(days=4))
    ledger.claim("scheduled__old", _candidates(exports))  # everything consumed once already

    start, end = DAY0 + timedelta(days=2), DAY0 + timedelta(days=4)
    taken = ledger.claim_interval("backfill__d2", _candidates(exports), start, end)
    assert sorted(taken) == sorted([at_start, day[2], day[3]])
    assert at_end not in taken
    assert ledger.claim_interval("backfill__d0", _candidates(exports), DAY0,
                                 DAY0 + timedelta(days=1)) == [day[0]]
    # re-running a backfill run gives the same answer
    assert ledger.claim_interval("backfill__d2", _candidates(exports), start, end) == taken
    backfill = [r for r in ledger.records() if r["run_id"] == "backfill__d2"]
    assert all(r["mode"] == "backfill" for r in backfill) and len(backfill) == 3
    assert {r["landed_at"] for r in backfill} == {
        (DAY0 + timedelta(days=2)).isoformat(), (DAY0 + timedelta(days=2, hours=12)).isoformat(),
        (DAY0 + timedelta(days=3, hours=12)).isoformat()}


def test_backfill_refuses_an_empty_interval(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(LedgerError, match="empty interval"):
        ledger.claim_interval("backfill__x", [], DAY0, DAY0)


def test_changed_redelivery_counts_as_new(tmp_path):
    exports, ledger = tmp_path / "exports", Ledger(tmp_path / "ledger.jsonl")
    a = _export(exports, "a", size=10)
    assert ledger.claim("run-1", _candidates(exports)) == [a]
    _export(exports, "a", size=10)  # same listing delivered again: already consumed
    assert ledger.claim("run-2", _candidates(exports)) == []
    _export(exports, "a", size=12)  # other content
    assert ledger.claim("run-3", _candidates(exports)) == [a]
    fingerprints = [r["fingerprint"] for r in ledger.records()]
    assert len(fingerprints) == 2 and fingerprints[0] != fingerprints[1]


def test_select_exports_takes_paths_and_uses_the_marker_time(tmp_path):
    exports = tmp_path / "exports"
    early = _export(exports, "early", landed=DAY0)
    late = _export(exports, "late", landed=DAY0 + timedelta(days=1))
    os.utime(Path(early) / "ann.xml", ((DAY0 + timedelta(days=1)).timestamp(),) * 2)
    interval = (DAY0, DAY0 + timedelta(hours=1))
    ledger = tmp_path / "ledger.jsonl"
    assert select_exports(ledger, "backfill__a", [early, late], interval, marker=MARKER) == [early]
    assert select_exports(ledger, "manual__b", [early, late], marker=MARKER) == [late]
    with pytest.raises(FileNotFoundError, match="missing"):
        select_exports(ledger, "manual__c", [str(exports / "missing")], marker=MARKER)
    # a re-run gets its exports back even after they were cleaned up
    assert select_exports(ledger, "manual__b", [str(exports / "missing")]) == [late]


def test_corrupt_ledger_line_is_reported_with_path_and_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps({"export": "a", "run_id": "r", "fingerprint": "f"}) + "\n{oops\n")
    with pytest.raises(LedgerError, match=f"{path}:2: not a JSON record"):
        Ledger(path).claim("run-2", [])


def _claim_loop(ledger_path: str, root: str, worker: int, start, out) -> None:
    candidates = list_exports(root, MARKER)
    start.wait()
    taken = {}
    for step in range(len(candidates)):
        run_id = f"w{worker}-{step}"
        taken[run_id] = Ledger(ledger_path).claim(run_id, candidates[:step + 1])
    out.put(taken)


def _claim_concurrently(ledger: str, exports: Path, workers: int, timeout: float) -> list[str]:
    """Every export path claimed by `workers` forked processes racing on one ledger."""
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_loop, args=(ledger, str(exports), w, start, out))
             for w in range(workers)]
    for proc in procs:
        proc.start()
    start.set()
    results = [out.get(timeout=timeout) for _ in procs]
    join_all(procs, 30)
    return [p for result in results for claim in result.values() for p in claim]


def test_concurrent_claims_never_double_consume(tmp_path):
    exports = tmp_path / "exports"
    paths = [_export(exports, f"e{i:02d}") for i in range(40)]
    ledger = str(tmp_path / "ledger.jsonl")
    taken = _claim_concurrently(ledger, exports, workers=4, timeout=30)
    assert sorted(taken) == paths  # each export exactly once, over all processes
    assert sorted(r["export"] for r in Ledger(ledger).records()) == paths


def test_take_all_takes_consumed_exports_again_and_records_it(tmp_path):
    root = tmp_path / "exports"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "x.xml").write_text("<annotation/>")
        (root / name / "_SUCCESS").write_text("")
    candidates = [str(root / "a"), str(root / "b")]
    ledger = tmp_path / "ledger.jsonl"
    assert select_exports(ledger, "run-1", candidates, marker="_SUCCESS") == candidates
    assert select_exports(ledger, "run-2", candidates, marker="_SUCCESS") == []
    assert select_exports(ledger, "run-3", candidates, marker="_SUCCESS",
                          take_all=True) == candidates
    assert {r["mode"] for r in Ledger(ledger).records() if r["run_id"] == "run-3"} == {"all"}


def test_concurrent_claims_on_gcs_never_double_consume(tmp_path, gcs_with_preconditions):
    """The gs:// ledger: read, then write only if the generation is unchanged (GCS's 412)."""
    exports = tmp_path / "exports"
    paths = [_export(exports, f"e{i:02d}") for i in range(12)]
    ledger = f"{gcs_with_preconditions}/ledger-{os.urandom(4).hex()}.jsonl"
    taken = _claim_concurrently(ledger, exports, workers=3, timeout=120)
    assert sorted(taken) == paths  # each export exactly once, over all processes
    assert sorted(r["export"] for r in Ledger(ledger).records()) == paths
