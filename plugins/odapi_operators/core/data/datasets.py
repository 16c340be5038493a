"""Dataset versions on disk: immutable, content-addressed, each knowing its parent.

    <datasets>/<fingerprint>/{manifest.jsonl,label_map.pbtxt,summary.json,diff.json}
    <datasets>/versions.jsonl   one line per version, in order of creation: parent, exports
                                absorbed, run id, counts added / changed / removed
    <datasets>/runs.jsonl       one line per run that ingested: the parent it built on and the
                                version it gave, so a re-run builds on the same parent

The same content gives the same fingerprint, so re-ingesting unchanged data publishes nothing
new. The current version is the one the newest run gave (usually the newest published; a run
whose content equals an earlier version makes that one current again).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from odapi_operators.core import storage
from odapi_operators.core.append_log import AppendLog
from odapi_operators.core.data.label_map import read_label_map
from odapi_operators.core.data.manifest import Manifest
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.rejections import StageError
from odapi_operators.core.storage import StorageError

DIFF = "diff.json"
VERSION_FILES = ("manifest.jsonl", "label_map.pbtxt", SUMMARY, DIFF)
VERSIONS = "versions.jsonl"
RUNS = "runs.jsonl"


def publish_version(datasets_dir: str | Path, ingest_dir: str | Path, summary: dict) -> bool:
    """Publish an ingest result as version `summary['fingerprint']`; False if it existed."""
    root = Path(datasets_dir)
    target = root / summary["fingerprint"]
    if (target / SUMMARY).exists():
        return False
    try:
        with storage.atomic_directory(target, replace=False) as tmp:
            for name in VERSION_FILES:
                shutil.copy(Path(ingest_dir) / name, tmp / name)
    except StorageError:
        return False  # another run published the same version meanwhile
    line = {key: summary.get(key) for key in (
        "fingerprint", "parent", "run_id", "images", "boxes", "classes", "exports",
        "added", "changed", "removed", "newest_landed_at", "inputs")}
    with storage.file_lock(root / VERSIONS), open(root / VERSIONS, "a") as fh:
        fh.write(json.dumps({**line, "created_at": time.time()}, sort_keys=True) + "\n")
    return True


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def list_versions(datasets_dir: str | Path) -> list[dict]:
    """versions.jsonl, oldest first."""
    return _lines(Path(datasets_dir) / VERSIONS)


def record_run(datasets_dir: str | Path, run: dict) -> dict:
    """Record what run `run['run_id']` built (first time only) and return the record kept:
    a re-run finds the first one, whatever it built now."""
    run_id = run.get("run_id")

    def decide(records: list[dict]) -> tuple[dict, list[dict]]:
        first = next((r for r in records if run_id and r.get("run_id") == run_id), None)
        return (first, []) if first else (run, [run])

    return AppendLog(Path(datasets_dir) / RUNS).transaction(decide)


def run_record(datasets_dir: str | Path, run_id: str | None) -> dict | None:
    """What run `run_id` built the first time it ingested (parent, version, label map)."""
    if not run_id:
        return None
    return next((r for r in _lines(Path(datasets_dir) / RUNS) if r.get("run_id") == run_id),
                None)


def current_version(datasets_dir: str | Path) -> str | None:
    """The fingerprint of the current version: the one the newest run gave."""
    root = Path(datasets_dir)
    for line in reversed(_lines(root / RUNS)):
        if (root / line.get("fingerprint", "") / SUMMARY).is_file():
            return line["fingerprint"]
    versions = list_versions(root)
    return versions[-1]["fingerprint"] if versions else None


def version_dir(datasets_dir: str | Path, fingerprint: str) -> Path:
    """The folder of version `fingerprint` (a unique prefix of it will do); a data error
    naming the datasets folder if there is no such version."""
    root = Path(datasets_dir)
    if fingerprint and (root / fingerprint / SUMMARY).is_file():
        return root / fingerprint
    found = sorted(p for p in root.glob(f"{fingerprint}*") if (p / SUMMARY).is_file()) \
        if re.fullmatch(r"[0-9a-f]+", fingerprint or "") else []
    if len(found) == 1:
        return found[0]
    known = ", ".join(v["fingerprint"] for v in list_versions(root)[-5:]) or "none"
    reason = "is ambiguous" if found else "is not a version"
    raise StageError(f"{root}: {fingerprint!r} {reason} (newest: {known})")


def version_manifest(datasets_dir: str | Path, fingerprint: str) -> Path:
    """The manifest of version `fingerprint`: its records in image-key order."""
    return version_dir(datasets_dir, fingerprint) / "manifest.jsonl"


def version_records(datasets_dir: str | Path, fingerprint: str) -> Manifest:
    """The records of version `fingerprint`, streamed from its manifest each time."""
    return Manifest(version_manifest(datasets_dir, fingerprint))


def version_label_map(datasets_dir: str | Path, fingerprint: str) -> dict[str, int]:
    return read_label_map(version_dir(datasets_dir, fingerprint) / "label_map.pbtxt")


def read_json(datasets_dir: str | Path, fingerprint: str, name: str) -> dict:
    """summary.json or diff.json of a version ({} for a version older than that file)."""
    path = version_dir(datasets_dir, fingerprint) / name
    return json.loads(path.read_text()) if path.is_file() else {}


def version_rows(datasets_dir: str | Path) -> list[dict]:
    """What `odapi dataset list` shows: every version, oldest first, the current one marked."""
    current = current_version(datasets_dir)
    return [{"version": line["fingerprint"], "current": "*" if line["fingerprint"] == current
             else "", "parent": line.get("parent"), "created": _when(line.get("created_at")),
             "run": line.get("run_id"), "images": line.get("images"), "boxes": line.get("boxes"),
             "changes": _changes(line)} for line in list_versions(datasets_dir)]


def show_version(datasets_dir: str | Path, fingerprint: str) -> dict:
    """What `odapi dataset show` prints: one version's line, exports absorbed and classes."""
    fingerprint = version_dir(datasets_dir, fingerprint).name
    line = next((v for v in list_versions(datasets_dir) if v["fingerprint"] == fingerprint), {})
    summary = read_json(datasets_dir, fingerprint, SUMMARY)
    changes = read_json(datasets_dir, fingerprint, DIFF)
    return {"fingerprint": fingerprint, "current": fingerprint == current_version(datasets_dir),
            "parent": changes.get("parent", line.get("parent")),
            "created": _when(line.get("created_at")), "run_id": line.get("run_id"),
            "images": summary.get("images"), "boxes": summary.get("boxes"),
            "newest_landed_at": summary.get("newest_landed_at"),
            "exports": changes.get("exports", []),
            **{k: len(changes.get(k, [])) for k in ("added", "changed", "removed")},
            "classes_before": changes.get("classes_before", {}),
            "classes": summary.get("classes", {}),
            "label_map": version_label_map(datasets_dir, fingerprint)}


def compare_versions(datasets_dir: str | Path, before: str, after: str) -> dict:
    """`odapi dataset diff A B`: images added, changed and removed from A to B, boxes per
    class on each side; any two versions, related or not."""
    from odapi_operators.core.data.versions import diff

    a, b = (version_dir(datasets_dir, v).name for v in (before, after))
    return {"before": a, "after": b,
            **diff(version_records(datasets_dir, a), version_records(datasets_dir, b))}


def _changes(line: dict) -> str:
    if line.get("added") is None:
        return ""  # a version from before versions recorded their diff
    return f"+{line['added']} ~{line['changed']} -{line['removed']}"


def _when(epoch: float | None) -> str | None:
    from datetime import UTC, datetime

    return None if epoch is None else \
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
