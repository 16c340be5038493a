"""Images stage: bring every manifest image into the run's image store.

Local sources are copied (resumably: an image already stored with the same size is not copied
again). Failures are reported per image and the rest go on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from odapi_operators.core import storage
from odapi_operators.core.manifest import ImageSource, read_manifest, write_manifest
from odapi_operators.core.report import RecordError, RejectionLog, StageError


def _copy_local(source: Path, target: Path) -> bool:
    """Copy atomically (keeping mtime); return False if the same copy was already there."""
    src_stat = source.stat()
    if target.exists():
        stat = target.stat()
        if (stat.st_size, stat.st_mtime_ns) == (src_stat.st_size, src_stat.st_mtime_ns):
            return False
    with storage.atomic_write(target) as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
    os.utime(target, ns=(src_stat.st_atime_ns, src_stat.st_mtime_ns))
    return True


def fetch_images(manifest: str | Path, out_dir: str | Path) -> dict:
    """Store each image under `out_dir/files/<key><suffix>`; write the updated manifest."""
    out = Path(out_dir)
    files = out / "files"
    log = RejectionLog()
    fetched, copied = [], 0
    for record in read_manifest(manifest):
        try:
            if record.source.kind != "local":
                raise ValueError(f"source kind {record.source.kind!r} is not supported yet")
            source = Path(record.source.uri)
            target = files / f"{record.key}{source.suffix.lower()}"
            copied += _copy_local(source, target)
        except (OSError, ValueError) as exc:
            log.add(RecordError(record.source.uri, record.key, f"fetch failed: {exc}").rejection)
            continue
        fetched.append(record.with_source(ImageSource("local", str(target))))
    write_manifest(out / "manifest.jsonl", fetched)
    log.write(out / "failures.jsonl")
    summary = {"ok": len(fetched), "failed": len(log), "copied": copied,
               "skipped": len(fetched) - copied, "manifest": str(out / "manifest.jsonl"),
               "failures": str(out / "failures.jsonl")}
    storage.write_text(out / "summary.json", json.dumps(summary, indent=2))
    if not fetched:
        raise StageError(f"no image could be fetched; see {summary['failures']}")
    return summary
