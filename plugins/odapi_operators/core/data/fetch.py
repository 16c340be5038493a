"""Images stage: bring every manifest image into the run's image store, fast and resumably.

Sources: http(s) URLs (`download.HttpDownloader`), `gs://` objects (the storage layer), local
files (inline export images were decoded to local files at ingest). Remote bytes must carry an
image's magic bytes; local files are the verify stage's to judge. Many threads keep many
requests in flight, since downloads wait on latency, not CPU; the only CPU work here is hashing.
Decoding belongs to the verify stage, which runs in worker processes.

The store is keyed by image key and content hash: `files/<key><ext>` (extension from the magic
bytes), one line per finished image in `fetch-index.jsonl` (`resume.ResumeIndex`). An image in
the index whose file is intact is never fetched again, so a re-run makes no request and a
killed run continues where it stopped; a re-run in which nothing changed keeps the manifest
it wrote (`resume.still_current`). Identical bytes under two keys are stored once (a hard
link). With an image cache (`image_cache.py`, `images.cache`), an image an earlier run fetched
from the same source is linked from there instead: a new run folder over a grown dataset
fetches only the new images. Failures are listed as (URL, key, reason) in `failures.jsonl`; above the failure budget
the stage fails, naming that list. A full disk stops the stage at once: it is not an image's
fault.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from odapi_operators.core import storage
from odapi_operators.core.budget import DEFAULT_MAX_FAILED_SHARE, check_budget
from odapi_operators.core.data.content import (
    EXTENSIONS,
    ContentError,
    check_md5,
    md5_hex,
    require_image,
    sniff_format,
)
from odapi_operators.core.data.download import DownloadPolicy, FetchError, HttpDownloader
from odapi_operators.core.data.file_names import fitting_name, name_limit
from odapi_operators.core.data.image_cache import SOURCES, identity, open_cache, place
from odapi_operators.core.data.manifest import (
    ImageRecord,
    ImageSource,
    count_records,
    read_manifest,
    write_manifest,
)
from odapi_operators.core.data.resume import ResumeIndex, file_sha256, outputs_of, still_current
from odapi_operators.core.failures import Failure
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.progress import Log, Progress
from odapi_operators.core.rejections import RecordError, RejectionLog, StageError

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}
INDEX_NAME = "fetch-index.jsonl"


def default_threads() -> int:
    """Latency-bound work: 64 requests in flight per core, capped."""
    return min(256, 64 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class _Stored:
    key: str
    entry: dict
    attempts: int
    linked: bool
    suffix: str
    reused: bool = False  # linked from the image cache, not read from the source


class _DiskError(Exception):
    """Writing the store failed for a reason no retry or other image can fix."""


class _Store:
    """`files/<key><ext>` written atomically (a key too long for a file name is shortened,
    `file_names.fitting_name`); identical content becomes a hard link."""

    def __init__(self, files: Path, by_hash: dict[str, str]):
        self.files = files
        self.by_hash = by_hash
        self.lock = threading.Lock()
        self.name_limit = name_limit(files)

    def put(self, key: str, data: bytes, suffix: str) -> tuple[Path, str, bool]:
        sha = hashlib.sha256(data).hexdigest()
        target = self.files / fitting_name(key, suffix, self.name_limit)
        with self.lock:
            first = self.by_hash.setdefault(sha, str(target))
        try:
            if first != str(target) and self._link(Path(first), target, len(data)):
                return target, sha, True
            with storage.atomic_write(target) as fh:
                fh.write(data)
        except OSError as exc:
            if exc.errno in DISK_ERRORS:
                raise _DiskError(f"cannot write {target}: {exc.strerror}") from None
            raise
        return target, sha, False

    def adopt(self, key: str, cached: str, sha: str, suffix: str) -> str | None:
        """`files/<key><ext>` as a link of the cache's copy; None if that cannot be done."""
        target = os.path.join(self.files, fitting_name(key, suffix, self.name_limit))
        if not place(cached, target):
            return None
        with self.lock:
            self.by_hash.setdefault(sha, target)
        return target

    @staticmethod
    def _link(existing: Path, target: Path, size: int) -> bool:
        try:
            if existing.stat().st_size != size:
                return False  # its first writer has not finished
            tmp = storage.temp_sibling(target)
            os.link(existing, tmp)
            os.replace(tmp, target)
            return True
        except OSError:
            return False  # other filesystem, or not there yet: write a copy instead


def _read(record: ImageRecord, http: HttpDownloader,
          policy: DownloadPolicy) -> tuple[bytes, str, int]:
    """(bytes, file suffix, requests made) for any source kind.

    Remote content must start with an image's magic bytes; a local file is the export's own,
    so a bad one is left to the verify stage, which quarantines it with its boxes.
    """
    kind, uri = record.source.kind, record.source.uri
    if kind == "url":
        fetched = http.get(uri, record.md5)
        return fetched.data, EXTENSIONS[fetched.format], fetched.attempts
    if kind not in ("local", "gs"):
        raise FetchError("unsupported source", f"source kind {kind!r}")
    limit = policy.max_bytes
    try:
        if kind == "local" and os.path.getsize(uri) > limit:
            raise FetchError("too large", f"{os.path.getsize(uri)} bytes > limit {limit}")
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise FetchError("not found", str(exc)) from None
    except OSError as exc:
        raise FetchError("unreadable", str(exc)) from None
    if len(data) > limit:
        raise FetchError("too large", f"{len(data)} bytes > limit {limit}")
    try:
        check_md5(md5_hex(data), record.md5)
        if kind == "gs":
            return data, EXTENSIONS[require_image(data[:16])], 1
    except ContentError as exc:
        raise FetchError(exc.kind, exc.detail) from None
    fmt = sniff_format(data[:16])
    return data, EXTENSIONS[fmt] if fmt else Path(uri).suffix.lower(), 0


def _source_stamp(record: ImageRecord) -> list | None:
    """Local sources can change in place: their size and mtime are part of the resume key."""
    if record.source.kind != "local":
        return None
    try:
        st = os.stat(record.source.uri)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _source_identity(record: ImageRecord, stamp: list | None) -> str:
    """What makes two fetches the same: the source, the export's md5, a local file's stamp."""
    return identity(record.source.kind, record.source.uri, record.md5, stamp)


def _is_done(entry: dict | None, record: ImageRecord, stamp: list | None) -> bool:
    if not entry or entry.get("source") != record.source.uri or entry.get("md5") != record.md5:
        return False
    if entry.get("stamp") != stamp:
        return False
    try:
        return os.path.getsize(entry["path"]) == entry["size"]
    except OSError:
        return False


def fetch_images(manifest: str | Path, out_dir: str | Path, *, threads: int | None = None,
                 max_failed_share: float = DEFAULT_MAX_FAILED_SHARE,
                 policy: DownloadPolicy | None = None, log: Log | None = None,
                 progress_every: float = 15.0, bar: bool = False,
                 files_dir: str | Path | None = None,
                 on_stored: Callable[[ImageRecord], None] | None = None,
                 cache_dir: str | Path | None = None, check_budgets: bool = True) -> dict:
    """Store each image of `manifest` under `files_dir` (default `out_dir/files`); write the
    updated manifest, failures.jsonl and summary.json to `out_dir`; return the summary.

    `on_stored` gets each record (pointing at its stored copy) as soon as it is in the store,
    resumed ones included: a consumer can start on images while others still download.
    `cache_dir` is the image cache shared by runs (None: none). Without `check_budgets` losing
    any share is the caller's to judge (a partition's images are a part of the run's).
    """
    return fetch_records(lambda: read_manifest(manifest), out_dir, threads=threads,
                         max_failed_share=max_failed_share, policy=policy, log=log,
                         progress_every=progress_every, bar=bar, files_dir=files_dir,
                         on_stored=on_stored, cache_dir=cache_dir, total=count_records(manifest),
                         check_budgets=check_budgets, source_sha256=file_sha256(manifest))


def fetch_records(records: Callable[[], Iterable[ImageRecord]], out_dir: str | Path, *,
                  threads: int | None = None,
                  max_failed_share: float = DEFAULT_MAX_FAILED_SHARE,
                  policy: DownloadPolicy | None = None, log: Log | None = None,
                  progress_every: float = 15.0, bar: bool = False,
                  files_dir: str | Path | None = None,
                  on_stored: Callable[[ImageRecord], None] | None = None,
                  cache_dir: str | Path | None = None, total: int | None = None,
                  check_budgets: bool = True, source_sha256: str | None = None) -> dict:
    """`fetch_images` over any re-iterable source of records (a manifest, an image index);
    `total` is how many it yields, if known (else it is counted). `source_sha256` names the
    records by content: a re-run over the same ones, all already stored, keeps its outputs."""
    out = Path(out_dir)
    files = Path(files_dir) if files_dir else out / "files"
    files.mkdir(parents=True, exist_ok=True)
    threads = threads or default_threads()
    policy = policy or DownloadPolicy()
    http: HttpDownloader | None = None  # made for the first image to fetch: a re-run has none
    index = ResumeIndex(out / INDEX_NAME)
    store = _Store(files, {e["sha256"]: e["path"] for e in index.entries.values()
                           if "sha256" in e})
    cache = open_cache(cache_dir)
    failures = RejectionLog()
    counts = {"downloaded": 0, "copied": 0, "reused": 0, "duplicates": 0, "requests": 0,
              "bytes": 0}
    total = sum(1 for _ in records()) if total is None else total
    keys: list[str] = []
    stored_keys: set[str] = set()  # in the store now: resumed, reused or fetched by this run
    started = time.monotonic()

    def reuse(record: ImageRecord, stamp: list | None) -> _Stored | None:
        """The image linked from the cache (a link is cheaper than a thread hand-off)."""
        hit = cache.get(SOURCES, _source_identity(record, stamp)) if cache else None
        path = hit and store.adopt(record.key, cache.object_path(hit["sha256"]),
                                   hit["sha256"], hit["suffix"])
        if not path:
            return None  # not cached, or the cache lost its copy
        entry = {"key": record.key, "source": record.source.uri, "md5": record.md5,
                 "stamp": stamp, "path": str(path), "size": hit["size"],
                 "sha256": hit["sha256"]}
        return _Stored(record.key, entry, 0, False, hit["suffix"], reused=True)

    def work(record: ImageRecord, stamp: list | None) -> _Stored:
        data, suffix, attempts = _read(record, http, policy)
        path, sha, linked = store.put(record.key, data, suffix)
        entry = {"key": record.key, "source": record.source.uri, "md5": record.md5,
                 "stamp": stamp, "path": str(path), "size": len(data), "sha256": sha}
        return _Stored(record.key, entry, attempts, linked, suffix)

    def finish(future: Future, record: ImageRecord, progress: Progress) -> None:
        try:
            stored = future.result()
        except FetchError as exc:
            failures.add(RecordError(record.source.uri, record.key, exc.reason).rejection)
            progress.update(ok=False)
            return
        except _DiskError as exc:
            raise StageError(f"fetch: disk error, stopping: {exc}", Failure.TRANSIENT) from None
        settle(stored, record, progress)

    def settle(stored: _Stored, record: ImageRecord, progress: Progress) -> None:
        index.put(stored.entry, flush=not stored.reused)  # a link is cheap to redo
        stored_keys.add(record.key)
        if on_stored:
            on_stored(_stored_record(record, stored.entry))
        if stored.reused:
            counts["reused"] += 1
        else:
            counts["downloaded" if record.source.kind != "local" else "copied"] += 1
            if cache:
                entry = stored.entry
                cache.add(entry["path"], entry["sha256"])
                cache.put(SOURCES, _source_identity(record, entry["stamp"]),
                          {"sha256": entry["sha256"], "size": entry["size"],
                           "suffix": stored.suffix})
        counts["duplicates"] += stored.linked
        counts["requests"] += stored.attempts
        counts["bytes"] += stored.entry["size"]
        progress.update(ok=True)

    try:
        with Progress("fetch", total, log=log, every=progress_every, bar=bar) as progress, \
                ThreadPoolExecutor(threads, thread_name_prefix="fetch") as pool:
            pending: dict[Future, ImageRecord] = {}
            try:
                for record in records():
                    keys.append(record.key)
                    stamp = _source_stamp(record)
                    if _is_done(index.get(record.key), record, stamp):
                        stored_keys.add(record.key)
                        progress.update(skipped=True)
                        if on_stored:
                            on_stored(_stored_record(record, index.get(record.key)))
                        continue
                    if reused := reuse(record, stamp):
                        settle(reused, record, progress)
                        continue
                    http = http or HttpDownloader(policy, connections=threads)
                    pending[pool.submit(work, record, stamp)] = record
                    while len(pending) >= 2 * threads:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            finish(future, pending.pop(future), progress)
                for future in list(pending):
                    wait([future])
                    finish(future, pending.pop(future), progress)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
        manifest_path, failures_path = out / "manifest.jsonl", out / "failures.jsonl"
        previous = None
        if not (failures or counts["downloaded"] or counts["copied"] or counts["reused"]) \
                and index.lines == len(index.entries) == len(keys):
            previous = still_current(out / SUMMARY, source_sha256, index.path,
                                     [manifest_path, failures_path])
        if previous:
            ok = previous["ok"]  # nothing changed: the manifest written then is this one
        else:
            ok = write_manifest(manifest_path, _fetched(records(), index, stored_keys))
            index.compact(keys)
    finally:
        index.close()
        if cache:
            cache.close()
    if not previous:
        failures.write(failures_path)
    fetched = counts["downloaded"] + counts["copied"]
    seconds = time.monotonic() - started
    summary = {"ok": ok, "failed": len(failures), "skipped": ok - fetched - counts["reused"],
               "fetched": fetched,
               **counts, "total": total, "seconds": round(seconds, 3),
               "images_per_s": round(fetched / seconds, 1) if seconds else None,
               "failed_share": round(len(failures) / total, 4) if total else 0.0,
               "max_failed_share": max_failed_share, "failures_by_reason": failures.by_reason(),
               "manifest": str(manifest_path), "failures": str(failures_path),
               "files": str(files), "outputs_of": outputs_of(source_sha256, index.path)}
    storage.write_text(out / SUMMARY, json.dumps(summary, indent=2))
    if check_budgets:
        check_fetch_budget(ok, len(failures), total, max_failed_share, str(failures_path))
    return summary


def check_fetch_budget(ok: int, failed: int, total: int, max_failed_share: float,
                       failures: str) -> None:
    """Fail when no image could be fetched, or more than `max_failed_share` of them."""
    if not ok and total:
        raise StageError(f"no image could be fetched; see {failures}", Failure.TRANSIENT)
    check_budget("fetch", failed, total, max_failed_share, failures,
                 Failure.TRANSIENT)  # a host down or a credential expiring: may pass


def _fetched(records: Iterable[ImageRecord], index: ResumeIndex,
             stored: set[str]) -> Iterator[ImageRecord]:
    """The input records, in input order, pointing at their stored copies (`stored`: the
    keys this run found or put in the store, so no file is looked at again)."""
    for record in records:
        entry = index.get(record.key)
        if record.key not in stored or entry is None or \
                (entry.get("source"), entry.get("md5")) != (record.source.uri, record.md5):
            continue  # failed in this run (an older entry, if any, is stale)
        yield _stored_record(record, entry)


def _stored_record(record: ImageRecord, entry: dict) -> ImageRecord:
    provenance = {**record.provenance, "sha256": entry["sha256"],
                  "fetched_from": record.source.uri}
    return record.with_source(ImageSource("local", entry["path"]), provenance=provenance)
