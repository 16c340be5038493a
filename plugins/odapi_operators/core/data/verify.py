"""Verify stage: decode every image in worker processes; normalize it; quarantine the bad ones.

Decoding is CPU work, so it runs in a process pool (one worker per core) fed a bounded window
of images in manifest order; `normalize.normalize` does the work on each. Boxes follow the
pixels (`orientation.transform_boxes`). Identical bytes give one output file. A rejected image
goes to `quarantine.jsonl` with its reason and the boxes it carried, never silently dropped.
Finished images are remembered in `verify-index.jsonl`, so a repeated run decodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image

from odapi_operators.core import storage
from odapi_operators.core.budget import DEFAULT_MAX_FAILED_SHARE, check_budget
from odapi_operators.core.data.file_names import fitting_name, name_limit
from odapi_operators.core.data.manifest import (
    ImageRecord,
    ImageSource,
    read_manifest,
    write_manifest,
)
from odapi_operators.core.data.normalize import NormalizeOptions, normalize, open_checked
from odapi_operators.core.data.orientation import transform_boxes
from odapi_operators.core.data.resume import ResumeIndex
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.progress import Log, Progress
from odapi_operators.core.rejections import StageError
from odapi_operators.core.stages.child import process_pool

INDEX_NAME = "verify-index.jsonl"
INLINE_BELOW = 16  # fewer images than this: a process pool costs more than it saves


def check_image(path: str | Path) -> tuple[str, int, int, str]:
    """Fully decode `path`; return (format, width, height, mode) or raise ValueError."""
    import warnings

    options = NormalizeOptions().resolved()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image, fmt = open_checked(Path(path).read_bytes(), options)
        with image:
            try:
                image.load()
            except OSError as exc:
                raise ValueError(f"corrupt image: {exc}") from None
            return fmt, image.width, image.height, image.mode


def _verify_file(path: str, rotation: int, expected: tuple[int, int] | None,
                 options: NormalizeOptions, out_path: str) -> dict:
    """Worker: one image -> result dict, or {"error": reason}. Never raises for bad images."""
    try:
        data = Path(path).read_bytes()
        result = normalize(data, rotation, options, expected)
    except (ValueError, OSError) as exc:
        return {"error": str(exc)}
    written = path
    if result.data is not None:
        with storage.atomic_write(out_path) as fh:
            fh.write(result.data)
        written = out_path
    return {"path": written, "width": result.width, "height": result.height,
            "ops": list(result.ops), "sha256": result.sha256, "resized": result.resized,
            "converted": result.data is not None,
            "source_sha256": hashlib.sha256(data).hexdigest()}


def _options_digest(options: NormalizeOptions) -> str:
    text = json.dumps({**asdict(options), "allowed_formats": sorted(options.allowed_formats)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stamp(path: str) -> list | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _is_done(entry: dict | None, record: ImageRecord, stamp, digest: str) -> bool:
    if not entry or stamp is None:
        return False
    if (entry.get("source"), entry.get("stamp"), entry.get("options"), entry.get("rotation"),
            entry.get("expected")) != (record.source.uri, stamp, digest, record.rotation,
                                       _expected(record)):
        return False
    return "error" in entry or os.path.exists(entry["path"])


def _expected(record: ImageRecord) -> list | None:
    return [record.width, record.height] if record.width and record.height else None


class _Decoder:
    """Feeds records to the worker pool (bounded window, manifest order) and fills the index."""

    def __init__(self, out: Path, options: NormalizeOptions, workers: int, index: ResumeIndex,
                 pool: Executor | None):
        self.out, self.options, self.workers, self.index, self.pool = \
            out, options, workers, index, pool
        self.digest = _options_digest(options)
        self.name_limit = name_limit(out)
        self.fresh = 0

    def run(self, records: Iterable[ImageRecord], progress: Progress | None) -> None:
        window: deque[tuple[ImageRecord, list | None, Future | dict]] = deque()
        for record in records:
            stamp = _stamp(record.source.uri)
            entry = self.index.get(record.key)
            if _is_done(entry, record, stamp, self.digest):
                if progress:
                    progress.update(ok="error" not in entry, skipped=True)
                continue
            expected = _expected(record)
            args = (record.source.uri, record.rotation, tuple(expected) if expected else None,
                    self.options,
                    str(self.out / "files" / fitting_name(record.key, ".jpg", self.name_limit)))
            outcome = self.pool.submit(_verify_file, *args) if self.pool else _verify_file(*args)
            window.append((record, stamp, outcome))
            while window and (len(window) > 4 * self.workers or not self.pool):
                self._settle(*window.popleft(), progress)
        while window:
            self._settle(*window.popleft(), progress)

    def _settle(self, record: ImageRecord, stamp, outcome: Future | dict,
                progress: Progress | None) -> None:
        result = outcome.result() if isinstance(outcome, Future) else outcome
        self.index.put({"key": record.key, "source": record.source.uri, "stamp": stamp,
                        "options": self.digest, "rotation": record.rotation,
                        "expected": _expected(record), **result})
        self.fresh += 1
        if progress:
            progress.update(ok="error" not in result)


def verify_images(manifest: str | Path, out_dir: str | Path, *, max_side: int | None = None,
                  workers: int | None = None, options: NormalizeOptions | None = None,
                  max_quarantined_share: float = DEFAULT_MAX_FAILED_SHARE,
                  log: Log | None = None,
                  progress_every: float = 15.0, bar: bool = False,
                  incoming: Iterable[ImageRecord] | None = None, incoming_total: int = 0) -> dict:
    """Verify and normalize every image of `manifest` into `out_dir`; return the summary.

    Writes `manifest.jsonl` (verified records, manifest order, boxes transformed with their
    pixels), `quarantine.jsonl` and `summary.json`. Fails when no image passes, or when more
    than `max_quarantined_share` of them are quarantined (a few bad files are listed and
    left out; many mean a broken export, and training on the rest would skew the data).
    `incoming` (with `incoming_total`) are records still being fetched: they are decoded as
    they arrive, and `manifest` is read only once `incoming` is exhausted (see
    `prepare.fetch_and_verify`).
    """
    out = Path(out_dir)
    options = (options or NormalizeOptions(max_side=max_side)).resolved()
    workers = workers or os.cpu_count() or 1
    total = incoming_total if incoming is not None else sum(1 for _ in read_manifest(manifest))
    index = ResumeIndex(out / INDEX_NAME)
    started = time.monotonic()
    pool = process_pool(workers) if workers > 1 and total >= INLINE_BELOW else None
    decoder = _Decoder(out, options, workers, index, pool)
    try:
        with Progress("verify", total, log=log, every=progress_every, bar=bar) as progress:
            # `incoming` carries every record the fetch stage's manifest will hold
            decoder.run(read_manifest(manifest) if incoming is None else incoming, progress)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    summary = _write_outputs(manifest, out, index)
    index.compact(r.key for r in read_manifest(manifest))
    index.close()
    seconds = time.monotonic() - started
    total = summary["ok"] + summary["failed"]
    summary.update({"skipped": total - decoder.fresh, "total": total,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(decoder.fresh / seconds, 1) if seconds else None,
                    "max_side": options.max_side,
                    "quarantined_share": round(summary["failed"] / total, 4) if total else 0.0,
                    "max_quarantined_share": max_quarantined_share})
    storage.write_text(out / SUMMARY, json.dumps(summary, indent=2))
    if not summary["ok"]:
        raise StageError(f"no image passed verification; see {summary['quarantine']}")
    check_budget("verify", summary["failed"], total, max_quarantined_share,
                 summary["quarantine"], lost="quarantined",
                 setting="images.max_quarantined_share")
    return summary


def _write_outputs(manifest: str | Path, out: Path, index: ResumeIndex) -> dict:
    """Verified manifest and quarantine list from the index, in manifest order; duplicates of
    an earlier image's bytes are pointed at its output and their own copy removed."""
    counts = {"ok": 0, "failed": 0, "boxes_quarantined": 0, "converted": 0, "resized": 0,
              "rotated": 0, "duplicates": 0}
    quarantine_path = out / "quarantine.jsonl"
    first_output: dict[tuple[str, int], str] = {}

    def verified() -> Iterator[ImageRecord]:
        with storage.atomic_write(quarantine_path, "w") as quarantine:
            for record in read_manifest(manifest):
                entry = index.get(record.key)
                if entry is None or "error" in entry:
                    reason = entry["error"] if entry else "not verified"
                    counts["failed"] += 1
                    counts["boxes_quarantined"] += len(record.boxes)
                    quarantine.write(json.dumps({
                        "file": record.source.uri, "record": record.key,
                        "reason": f"quarantined: {reason} ({len(record.boxes)} boxes not used)",
                        "boxes": [asdict(b) for b in record.boxes]}, sort_keys=True) + "\n")
                    continue
                path = entry["path"]
                same = (entry["source_sha256"], record.rotation)
                earlier = first_output.get(same)
                if earlier is None:
                    first_output[same] = path
                else:
                    counts["duplicates"] += 1
                    if earlier != path and entry["converted"] and os.path.exists(earlier):
                        Path(path).unlink(missing_ok=True)
                        path = earlier
                        index.put({**entry, "path": path})
                counts["ok"] += 1
                counts["converted"] += entry["converted"]
                counts["resized"] += entry["resized"]
                counts["rotated"] += bool(entry["ops"])
                yield record.with_source(
                    ImageSource("local", path), width=entry["width"], height=entry["height"],
                    boxes=transform_boxes(record.boxes, entry["ops"]), rotation=0,
                    provenance={**record.provenance, "sha256": entry["sha256"],
                                "verified_from": record.source.uri,
                                "transposes": entry["ops"]})

    manifest_path = out / "manifest.jsonl"
    write_manifest(manifest_path, verified())
    return {**counts, "manifest": str(manifest_path), "quarantine": str(quarantine_path)}
