"""Dataset versions: each ingest result, identified by its content fingerprint, kept immutable.

    <datasets>/<fingerprint>/{manifest.jsonl,label_map.pbtxt,summary.json}
    <datasets>/versions.jsonl     one line per version, in order of creation

The same exports in give the same fingerprint out, so re-ingesting unchanged data creates no
new version.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from odapi_operators.core import storage
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.storage import StorageError

VERSION_FILES = ("manifest.jsonl", "label_map.pbtxt", SUMMARY)


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
    line = {"fingerprint": summary["fingerprint"], "created_at": time.time(),
            "images": summary["images"], "boxes": summary["boxes"],
            "classes": summary["classes"], "inputs": summary["inputs"]}
    with storage.file_lock(root / "versions.jsonl"), open(root / "versions.jsonl", "a") as fh:
        fh.write(json.dumps(line, sort_keys=True) + "\n")
    return True


def list_versions(datasets_dir: str | Path) -> list[dict]:
    path = Path(datasets_dir) / "versions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
