"""The model registry: an append-only JSON-lines log of every candidate and every label move.

    <serving_base>/registry.jsonl   (or `serving.registry`)

One `candidate` record per run (run id, dataset version, config, metrics, decision, pushed
version and path), built from the run's own folder, so it can be written once at the end of a
run whatever happened. Records are never edited: a retried run appends a newer record for the
same run id, and readers keep the newest one per run. `label` records (promotions,
rollbacks) are what `rollback` reads to find the previous stable version. A last line torn by
a crash mid-append is ignored by readers and cut off by the next append, with a warning: it
never blocks a push, a rollback or `odapi models list`.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from odapi_operators.core import storage, testpoints
from odapi_operators.core.jsonl import parse_json_lines
from odapi_operators.core.layout import RunFile, RunLayout, Stage

_GS_RETRIES = 20
_APPENDING = "registry:appending"
METRIC_COLUMNS = ("AP", "AP50")
log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _parse(text: str, source: str, model: str | None = None) -> list[dict]:
    return [r for r in parse_json_lines(text, source) if model is None or r.get("model") == model]


def _whole_lines(text: str, source: str, fate: str) -> str:
    """`text` ending in a complete line. Every record goes in as one write ending with its
    newline, so an unterminated last line is a write cut short (a crash mid-append): if it
    still parses it only lost its newline and gets it back, otherwise it is left out (`fate`
    says how) with a warning naming it. A bad line anywhere else is corruption: `_parse`
    refuses it."""
    if not text or text.endswith("\n"):
        return text
    kept = text[:text.rfind("\n") + 1]
    tail = text[len(kept):]
    try:
        if isinstance(json.loads(tail), dict):
            return text + "\n"
    except json.JSONDecodeError:
        pass
    log.warning("%s:%d: a torn last line (a write cut short by a crash) is %s: %r", source,
                kept.count("\n") + 1, fate, tail)
    return kept


def read(path: str | os.PathLike, model: str | None = None) -> list[dict]:
    """Every record, oldest first (optionally one model's); a missing registry is empty."""
    if not storage.exists(path):
        return []
    source = os.fspath(path)
    return _parse(_whole_lines(storage.read_text(path), source, "ignored"), source, model)


def _same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "recorded_at"} == \
        {k: v for k, v in b.items() if k != "recorded_at"}


def append(path: str | os.PathLike, record: dict) -> dict:
    """Append `record` (stamped `recorded_at`), unless the newest record of the same run is
    identical: retries must not grow the log. Returns the record as stored."""
    record = {**record, "recorded_at": _now()}

    def already(existing: list[dict]) -> dict | None:
        if record.get("kind") != "candidate":
            return None
        runs = [r for r in existing if r.get("kind") == "candidate" and
                (r.get("model"), r.get("run_id")) == (record["model"], record["run_id"])]
        return runs[-1] if runs and _same(runs[-1], record) else None

    line = json.dumps(record, sort_keys=True) + "\n"
    source, repaired = os.fspath(path), "dropped from the file"
    if storage.is_local(path):
        local = Path(path)
        with storage.file_lock(local):
            text = local.read_text() if local.exists() else ""
            whole = _whole_lines(text, source, repaired)
            found = already(_parse(whole, source))
            if found:
                return found
            if len(whole) < len(text):
                os.truncate(local, len(whole.encode()))
            _append_line(local, whole[len(text):] + line)  # + a lost newline, if any
        return record
    for _ in range(_GS_RETRIES):  # objects cannot be appended to: rewrite, if unchanged since
        try:
            generation, text = storage.stat(path).generation, storage.read_text(path)
        except FileNotFoundError:
            generation, text = 0, ""
        whole = _whole_lines(text, source, repaired)
        found = already(_parse(whole, source))
        if found:
            return found
        try:
            storage.write_bytes_if_generation(path, (whole + line).encode(), generation)
            return record
        except storage.PreconditionFailed:
            continue
    raise storage.StorageError(f"{source}: still changing after {_GS_RETRIES} attempts")


def _append_line(path: Path, line: str) -> None:
    """One write of one line, then durable. A test pausing at `registry:appending` gets half
    the line first, so its kill tears the last line as a crash mid-write would."""
    cut = len(line) // 2 if os.environ.get(testpoints.ENV) == _APPENDING else len(line)
    with open(path, "a") as fh:
        fh.write(line[:cut])
        fh.flush()
        testpoints.reached(_APPENDING)
        fh.write(line[cut:])
        fh.flush()
        os.fsync(fh.fileno())


def _read_json(path: str) -> dict:
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, dict))}


def register_run(path: str | os.PathLike, run_dir: str | os.PathLike, model: str,
                 run_id: str) -> dict:
    """Append the candidate record of one run, built from its stage folders.

    Call it once at the end of the run whatever happened (a rejected candidate has no push,
    a failed one may have no decision): the record says how far the run got.
    """
    run = os.fspath(run_dir).rstrip("/")
    layout = RunLayout.of(run)
    metrics = _read_json(str(layout.file(RunFile.CANDIDATE_METRICS)))
    production = _read_json(str(layout.file(RunFile.PRODUCTION_METRICS)))
    report = str(layout.file(RunFile.REPORT))
    decision = _read_json(str(layout.file(RunFile.DECISION)))
    pushed = _read_json(str(layout.summary(Stage.PUSH)))
    ingest = _read_json(str(layout.summary(Stage.INGEST)))
    config = str(layout.file(RunFile.CONFIG))
    record = {
        "kind": "candidate", "model": model, "run_id": run_id, "run_dir": run,
        "dataset_version": decision.get("dataset_version") or ingest.get("fingerprint"),
        "config": config if storage.exists(config) else None,
        "metrics": _numbers(metrics),
        "production_metrics": _numbers(production) or None,
        "report": report if storage.exists(report) else None,
        "decision": ({k: decision.get(k) for k in ("promoted", "rule", "reason", "forced",
                                                   "force", "baseline", "approval", "canary")}
                     | {"path": str(layout.file(RunFile.DECISION))}) if decision else None,
        "version": pushed.get("version"), "path": pushed.get("path"),
        "decided_at": decision.get("decided_at"),
    }
    return append(path, record)


def record_label(path: str | os.PathLike, model: str, label: str, version: int | None,
                 previous: int | None, action: str, reason: str | None = None,
                 by: str | None = None) -> dict:
    """Record a label move (`action`: promote, rollback, canary; `version` None: the label
    was removed, e.g. after a canary check)."""
    return append(path, {"kind": "label", "model": model, "label": label, "version": version,
                         "previous": previous, "action": action, "reason": reason, "by": by})


def candidates(records: list[dict]) -> list[dict]:
    """The newest candidate record per (model, run), in order of first appearance."""
    latest: dict[tuple, dict] = {}
    for record in records:
        if record.get("kind") == "candidate":
            key = (record.get("model"), record.get("run_id"))
            latest.pop(key, None)
            latest[key] = record
    return list(latest.values())


def label_history(records: list[dict], model: str, label: str) -> list[int | None]:
    """Versions `label` of `model` pointed to, in order (None: removed)."""
    return [r["version"] for r in records if r.get("kind") == "label"
            and r.get("model") == model and r.get("label") == label]


def _verdict(decision: dict | None) -> str:
    if not decision:
        return "-"
    if not decision.get("promoted"):
        return "rejected"
    canary = decision.get("canary") or {}
    if canary and not canary.get("passed"):
        return "canary failed"
    choice = (decision.get("approval") or {}).get("choice")
    if choice in ("reject", "canary"):
        return "approver rejected" if choice == "reject" else "canary only"
    if decision.get("forced"):
        return "forced"
    return "first model" if decision.get("rule") == "first_model" else "promoted"


def rows(records: list[dict], labels: dict[str, dict[str, int]] | None = None) -> list[dict]:
    """What `odapi models list` shows: candidates (newest per run) and label moves, in order.

    `labels` maps model -> current labels from models.config, shown next to each version.
    """
    keep = {id(r) for r in candidates(records)}
    out = []
    for r in records:
        if r.get("kind") == "candidate" and id(r) in keep:
            decision = r.get("decision")
            current = (labels or {}).get(r["model"], {})
            out.append({"recorded": r.get("recorded_at"), "model": r.get("model"),
                        "run": r.get("run_id"), "dataset": (r.get("dataset_version") or "-")[:12],
                        **{m: (r.get("metrics") or {}).get(m) for m in METRIC_COLUMNS},
                        "decision": _verdict(decision), "version": r.get("version"),
                        "labels": ",".join(sorted(k for k, v in current.items()
                                                  if v == r.get("version")))})
        elif r.get("kind") == "label":
            previous = r.get("previous")
            note = (f"{r['action']}: {r['label']} {previous or 'none'} -> "
                    f"{'removed' if r['version'] is None else r['version']}")
            out.append({"recorded": r.get("recorded_at"), "model": r.get("model"),
                        "run": "-", "dataset": "-", **{m: None for m in METRIC_COLUMNS},
                        "decision": note + (f" ({r['reason']})" if r.get("reason") else ""),
                        "version": r["version"], "labels": ""})
    return out


def format_table(table: list[dict[str, Any]]) -> str:
    """A plain aligned text table (numbers to 3 decimals, empty cells as '-')."""
    if not table:
        return "no records"
    columns = list(table[0])

    def cell(value: Any) -> str:
        if value is None or value == "":
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [[cell(row[c]) for c in columns] for row in table]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)
