"""What was sent for labeling, and what came back labeled.

The sent ledger is an append-only JSON-lines file (local or gs://, `append_log.AppendLog`):
one line per image sent, with the model it was sent for, its key, content hash, origin URI,
dHash, the batch and the model version that pre-annotated it. An image is known by any of
its identities (key, sha256, URI), so one renamed or re-hosted copy is still recognised;
claims are atomic, so two runs never send the same image.

Labels come back as our manifest (`manifest.jsonl`, or a folder holding one) or as any
annotation export ingest reads (Prodigy, Label Studio, ...): `labeled_identities` gives the
identities of every image in it, to skip those images and to count returns.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from odapi_operators.core.append_log import AppendLog
from odapi_operators.core.data.manifest import ImageRecord, read_manifest
from odapi_operators.core.data.resume import sha256_of
from odapi_operators.core.rejections import StageError

REQUIRED = ("model", "key", "sha256")
MANIFEST_NAME = "manifest.jsonl"


def identities(key: str | None, sha256: str | None = None, uri: str | None = None) -> set[str]:
    """The names one image answers to: `key:...`, `sha:...`, `uri:...`."""
    return {f"{kind}:{value}" for kind, value in (("key", key), ("sha", sha256), ("uri", uri))
            if value}


def entry_identities(entry: dict) -> set[str]:
    return identities(entry.get("key"), entry.get("sha256"), entry.get("uri"))


def _parse(text: str, path: str) -> list[dict]:
    from odapi_operators.core.jsonl import parse_json_lines

    records = parse_json_lines(text, path)
    for number, record in enumerate(records, 1):
        if not all(record.get(k) for k in REQUIRED):
            raise ValueError(f"{path}: record {number} needs {', '.join(REQUIRED)}")
    return records


class SentLedger:
    """The ledger at `path` (one file may hold several models' lines)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.log = AppendLog(self.path, _parse)

    def records(self, model: str | None = None) -> list[dict]:
        return [r for r in self.log.records() if model is None or r["model"] == model]

    def claim(self, model: str, batch: str, entries: list[dict]) -> list[dict]:
        """Record `entries` (dicts with key, sha256, uri, ...) as sent for `model` in `batch`;
        return the entries the batch owns now: new ones, and those an earlier attempt of the
        same batch recorded. Images another batch sent first (maybe a concurrent run) are
        left out."""
        now = datetime.now(timezone.utc).isoformat()

        def decide(records: list[dict]) -> tuple[list[dict], list[dict]]:
            mine = [r for r in records if r["model"] == model]
            ours = set().union(*(entry_identities(r) for r in mine if r.get("batch") == batch))
            taken = set().union(*(entry_identities(r) for r in mine if r.get("batch") != batch))
            owned, new = [], []
            for entry in entries:
                ids = entry_identities(entry)
                if ids & taken:
                    continue
                owned.append(entry)
                if not ids & ours:
                    new.append({**entry, "model": model, "batch": batch, "sent_at": now})
                taken |= ids
            return owned, new

        return self.log.transaction(decide)


def _is_manifest(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = fh.readline()
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and {"key", "source", "boxes"} <= set(record)


def _record_identities(record: ImageRecord, sizes: set[int] | None) -> set[str]:
    uri = record.source.uri
    ids = identities(record.key, None, uri) | identities(None, None,
                                                          record.provenance.get("fetched_from"))
    if record.source.kind == "local" and os.path.isfile(uri):
        if sizes is None or os.path.getsize(uri) in sizes:  # hash only possible matches
            ids.add(f"sha:{sha256_of(uri)}")
    return ids


def labeled_identities(labeled: str | os.PathLike[str], images_root: str | None = None,
                       sizes: set[int] | None = None) -> set[str]:
    """Identities of every labeled image in a manifest, an ingest folder or an export.

    An export is parsed by ingest (images named in it resolve inside `images_root`, e.g. the
    pool folder); local files are content-hashed when their size is in `sizes` (None: all).
    """
    path = Path(labeled)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        path = path / MANIFEST_NAME
    if path.is_file() and _is_manifest(path):
        return set().union(*(_record_identities(r, sizes) for r in read_manifest(path)))
    from odapi_operators.core.data.ingest import ingest

    with tempfile.TemporaryDirectory(prefix="odapi-labeled-") as tmp:
        out = Path(tmp) / "ingest"
        try:
            ingest([str(path)], out, images_root=images_root)
        except StageError as exc:
            if not (out / MANIFEST_NAME).is_file():
                raise
            print(f"labeled: {exc}", file=sys.stderr)  # nothing usable: nothing labeled
        return set().union(*(_record_identities(r, sizes)
                             for r in read_manifest(out / MANIFEST_NAME)))


def came_back(sent: Iterable[dict], labeled: set[str]) -> dict:
    """How many sent images are labeled now, overall and per batch."""
    total, back, batches = 0, 0, {}
    for entry in sent:
        hit = bool(entry_identities(entry) & labeled)
        total, back = total + 1, back + hit
        batch = batches.setdefault(entry.get("batch") or "?", {"sent": 0, "labeled": 0})
        batch["sent"] += 1
        batch["labeled"] += hit
    return {"sent": total, "labeled": back,
            "share": round(back / total, 4) if total else None, "batches": batches}
