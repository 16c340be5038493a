"""Verify stage: decode every image in worker processes; normalize it; quarantine the bad ones.

Decoding is CPU work, so it runs in a process pool (one worker per core) fed a bounded window
of images in manifest order; `normalize.normalize` does the work on each. Boxes follow the
pixels (`orientation.transform_boxes`). Identical bytes give one output file. A rejected image
goes to `quarantine.jsonl` with its reason and the boxes it carried, never silently dropped.
Finished images are remembered in `verify-index.jsonl`, so a repeated run decodes nothing (and,
when nothing changed, keeps the outputs it wrote: `resume.still_current`).
With an image cache (`image_cache.py`, `images.cache`), bytes an earlier run verified with
the same options, rotation and annotated size are not decoded again in a new run folder
either: their result (and re-encoded output) comes from the cache.
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
from odapi_operators.core.data.image_cache import VERIFIED, ImageCache, identity, open_cache, place
from odapi_operators.core.data.manifest import (
    ImageRecord,
    ImageSource,
    count_records,
    read_manifest,
    write_manifest,
)
from odapi_operators.core.data.normalize import NormalizeOptions, normalize, open_checked
from odapi_operators.core.data.orientation import transform_boxes
from odapi_operators.core.data.resume import ResumeIndex, file_sha256, outputs_of, still_current
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.progress import Log, Progress
from odapi_operators.core.rejections import StageError

INDEX_NAME = "verify-index.jsonl"
INLINE_BELOW = 16  # fewer images than this: a process pool costs more than it saves
WINDOW = 4096  # results held for manifest order behind one still decoding


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
                 options: NormalizeOptions, out_path: str, source_sha256: str | None = None
                 ) -> dict:
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
            "source_sha256": source_sha256 or hashlib.sha256(data).hexdigest()}


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


def _content_sha256(record: ImageRecord) -> str | None:
    """The sha256 of the record's bytes: fetch's, for a file in its store (written once, by
    content), else hashed here; None if unreadable (the worker reports it)."""
    if "fetched_from" in record.provenance and record.provenance.get("sha256"):
        return record.provenance["sha256"]
    return file_sha256(record.source.uri)


# what a verify result holds besides where its output is: the same for the same inputs
_CACHED_FIELDS = ("width", "height", "ops", "sha256", "resized", "converted")


class _Decoder:
    """Feeds records to the worker pool (bounded window, manifest order) and fills the index;
    results the image cache holds are taken from it instead of decoding."""

    def __init__(self, out: Path, options: NormalizeOptions, workers: int, index: ResumeIndex,
                 pooled: bool, cache: ImageCache | None = None):
        self.out, self.options, self.workers, self.index, self.pooled, self.cache = \
            out, options, workers, index, pooled, cache
        self.pool: Executor | None = None  # started by the first image to decode, if any
        self.digest = _options_digest(options)
        self.name_limit = name_limit(out)
        self.files = str(out / "files")  # a str: joined once per image
        self.fresh = self.reused = 0

    def run(self, records: Iterable[ImageRecord], progress: Progress | None) -> None:
        """Results are settled in manifest order; only decodes in flight are bounded (4 per
        worker), so cached results flow on while a few images decode."""
        window: deque[tuple[ImageRecord, list | None, Future | dict, str | None, bool]] = \
            deque()
        in_flight = 0
        for record in records:
            stamp = _stamp(record.source.uri)
            entry = self.index.get(record.key)
            if _is_done(entry, record, stamp, self.digest):
                if progress:
                    progress.update(ok="error" not in entry, skipped=True)
                continue
            expected = _expected(record)
            out_path = os.path.join(self.files, fitting_name(record.key, ".jpg",
                                                             self.name_limit))
            source_sha = _content_sha256(record) if self.cache else None
            key = identity(source_sha, record.rotation, expected, self.digest) \
                if source_sha else None
            outcome = self._from_cache(key, record.source.uri, out_path) if key else None
            reused = outcome is not None
            if outcome is None:
                args = (record.source.uri, record.rotation,
                        tuple(expected) if expected else None, self.options, out_path,
                        source_sha)
                outcome = self._pool().submit(_verify_file, *args) if self.pooled \
                    else _verify_file(*args)
            else:
                outcome["source_sha256"] = source_sha
            window.append((record, stamp, outcome, key, reused))
            in_flight += isinstance(outcome, Future)
            while window and (not isinstance(head := window[0][2], Future) or head.done()
                              or in_flight > 4 * self.workers or len(window) > WINDOW):
                in_flight -= isinstance(head, Future)
                self._settle(*window.popleft(), progress)
        while window:
            self._settle(*window.popleft(), progress)

    def _pool(self) -> Executor:
        if self.pool is None:
            from odapi_operators.core.stages.child import process_pool

            self.pool = process_pool(self.workers)
        return self.pool

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)

    def _from_cache(self, key: str, source: str, out_path: str) -> dict | None:
        """An earlier run's result for the same bytes and settings, its output in place."""
        hit = self.cache.get(VERIFIED, key)
        if hit is None:
            return None
        result = {field: hit[field] for field in _CACHED_FIELDS}
        if not hit["converted"]:
            return {**result, "path": source}  # the input bytes are the output
        if not place(self.cache.object_path(hit["sha256"]), out_path):
            return None  # the cache lost it: decode again
        return {**result, "path": out_path}

    def _settle(self, record: ImageRecord, stamp, outcome: Future | dict, key: str | None,
                reused: bool, progress: Progress | None) -> None:
        result = outcome.result() if isinstance(outcome, Future) else outcome
        if reused:
            self.reused += 1
        else:
            self.fresh += 1
            if key and "error" not in result:  # an error may be passing (a read failing)
                if result["converted"]:
                    self.cache.add(result["path"], result["sha256"])
                self.cache.put(VERIFIED, key, {f: result[f] for f in _CACHED_FIELDS})
        self.index.put({"key": record.key, "source": record.source.uri, "stamp": stamp,
                        "options": self.digest, "rotation": record.rotation,
                        "expected": _expected(record), **result},
                       flush=not reused)  # a cached result is cheap to take again
        if progress:
            progress.update(ok="error" not in result)


def verify_images(manifest: str | Path, out_dir: str | Path, *, max_side: int | None = None,
                  workers: int | None = None, options: NormalizeOptions | None = None,
                  max_quarantined_share: float = DEFAULT_MAX_FAILED_SHARE,
                  log: Log | None = None,
                  progress_every: float = 15.0, bar: bool = False,
                  incoming: Iterable[ImageRecord] | None = None, incoming_total: int = 0,
                  cache_dir: str | Path | None = None, check_budgets: bool = True) -> dict:
    """Verify and normalize every image of `manifest` into `out_dir`; return the summary.

    Writes `manifest.jsonl` (verified records, manifest order, boxes transformed with their
    pixels), `quarantine.jsonl` and `summary.json`. Fails when no image passes, or when more
    than `max_quarantined_share` of them are quarantined (a few bad files are listed and
    left out; many mean a broken export, and training on the rest would skew the data).
    `incoming` (with `incoming_total`) are records still being fetched: they are decoded as
    they arrive, and `manifest` is read only once `incoming` is exhausted (see
    `prepare.fetch_and_verify`). `cache_dir` is the image cache shared by runs (None: none).
    Without `check_budgets` the caller judges the losses (a partition's are a part of the run's).
    """
    out = Path(out_dir)
    options = (options or NormalizeOptions(max_side=max_side)).resolved()
    workers = workers or os.cpu_count() or 1
    total = incoming_total if incoming is not None else count_records(manifest)
    index = ResumeIndex(out / INDEX_NAME)
    started = time.monotonic()
    cache = open_cache(cache_dir)
    decoder = _Decoder(out, options, workers, index, workers > 1 and total >= INLINE_BELOW,
                       cache)
    try:
        with Progress("verify", total, log=log, every=progress_every, bar=bar) as progress:
            # `incoming` carries every record the fetch stage's manifest will hold
            decoder.run(read_manifest(manifest) if incoming is None else incoming, progress)
    finally:
        decoder.close()
        if cache:
            cache.close()
    keys: list[str] = []
    source_sha256 = file_sha256(manifest)  # complete now, also when fed by a running fetch
    outputs = [out / "manifest.jsonl", out / "quarantine.jsonl"]
    previous = None
    if not (decoder.fresh or decoder.reused) and index.lines == len(index.entries):
        previous = still_current(out / SUMMARY, source_sha256, index.path, outputs)
    if previous:  # nothing changed: the outputs written then are this run's
        summary = {key: previous[key] for key in _OUTPUT_COUNTS}
    else:
        summary = _write_outputs(manifest, out, index, keys)
        index.compact(keys)
    index.close()
    seconds = time.monotonic() - started
    total = summary["ok"] + summary["failed"]
    summary.update({"skipped": total - decoder.fresh - decoder.reused,
                    "reused": decoder.reused, "total": total,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(decoder.fresh / seconds, 1) if seconds else None,
                    "max_side": options.max_side,
                    "quarantined_share": round(summary["failed"] / total, 4) if total else 0.0,
                    "max_quarantined_share": max_quarantined_share,
                    "outputs_of": outputs_of(source_sha256, index.path)})
    storage.write_text(out / SUMMARY, json.dumps(summary, indent=2))
    if check_budgets:
        check_verify_budget(summary["ok"], summary["failed"], max_quarantined_share,
                            summary["quarantine"])
    return summary


def check_verify_budget(ok: int, quarantined: int, max_quarantined_share: float,
                        quarantine: str) -> None:
    """Fail when no image passed, or more than `max_quarantined_share` were quarantined."""
    if not ok:
        raise StageError(f"no image passed verification; see {quarantine}")
    check_budget("verify", quarantined, ok + quarantined, max_quarantined_share, quarantine,
                 lost="quarantined", setting="images.max_quarantined_share")


_OUTPUT_COUNTS = ("ok", "failed", "boxes_quarantined", "converted", "resized", "rotated",
                  "duplicates", "manifest", "quarantine")  # what `_write_outputs` returns


def _write_outputs(manifest: str | Path, out: Path, index: ResumeIndex, keys: list[str]) -> dict:
    """Verified manifest and quarantine list from the index, in manifest order; duplicates of
    an earlier image's bytes are pointed at its output and their own copy removed. `keys`
    gets the manifest's keys."""
    counts = {"ok": 0, "failed": 0, "boxes_quarantined": 0, "converted": 0, "resized": 0,
              "rotated": 0, "duplicates": 0}
    quarantine_path = out / "quarantine.jsonl"
    first_output: dict[tuple[str, int], str] = {}

    def verified() -> Iterator[ImageRecord]:
        with storage.atomic_write(quarantine_path, "w") as quarantine:
            for record in read_manifest(manifest):
                keys.append(record.key)
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
