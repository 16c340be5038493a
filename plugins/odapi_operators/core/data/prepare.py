"""`odapi prepare`: manifest -> images -> verified images -> label map -> TFRecords, one call.

The same stage functions the DAG runs one task each, in one process, each in its own folder
under `out_dir`; every stage resumes, so a repeated `prepare` over the same inputs makes no
network request, decodes nothing and reuses the shards. Download and verify overlap: images
are decoded in worker processes while the download threads still wait on the network, so the
two take about as long as the slower of them, not their sum.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

from odapi_operators.core import storage, testpoints
from odapi_operators.core.budget import DEFAULT_MAX_FAILED_SHARE
from odapi_operators.core.data.download import DownloadPolicy
from odapi_operators.core.data.fetch import fetch_images
from odapi_operators.core.data.manifest import count_records
from odapi_operators.core.data.verify import verify_images
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.progress import Log

_DONE = object()


def fetch_and_verify(manifest: str | Path, out_dir: str | Path, *, max_side: int | None = None,
                     threads: int | None = None, workers: int | None = None,
                     max_failed_share: float = DEFAULT_MAX_FAILED_SHARE,
                     max_quarantined_share: float = DEFAULT_MAX_FAILED_SHARE,
                     policy: DownloadPolicy | None = None, log: Log | None = None,
                     bar: bool = False, image_cache_dir: str | None = None,
                     check_budgets: bool = True) -> tuple[dict, dict]:
    """Fetch into `out_dir/images` and verify into `out_dir/verify`, concurrently, reusing
    what earlier runs left in `image_cache_dir` (if given); `check_budgets`: as in both."""
    out = Path(out_dir)
    arrived: queue.Queue = queue.Queue(maxsize=4096)
    outcome: dict = {}

    def fetch() -> None:
        try:
            outcome["fetched"] = fetch_images(manifest, out / "images", threads=threads,
                                              max_failed_share=max_failed_share, policy=policy,
                                              log=log, bar=bar, on_stored=arrived.put,
                                              cache_dir=image_cache_dir,
                                              check_budgets=check_budgets)
        except BaseException as exc:  # re-raised below, in the caller's thread
            outcome["error"] = exc
        finally:
            arrived.put(_DONE)

    fetcher = threading.Thread(target=fetch, name="fetch", daemon=True)
    fetcher.start()
    try:
        verified = verify_images(out / "images" / "manifest.jsonl", out / "verify",
                                 max_side=max_side, workers=workers,
                                 max_quarantined_share=max_quarantined_share, log=log,
                                 incoming=_until_done(arrived, outcome),
                                 incoming_total=count_records(manifest),
                                 cache_dir=image_cache_dir, check_budgets=check_budgets)
    finally:
        fetcher.join()
    return outcome["fetched"], verified


def _until_done(arrived: queue.Queue, outcome: dict):
    while (item := arrived.get()) is not _DONE:
        yield item
        testpoints.reached("prepare:verifying")  # some images fetched and verified, not all
    if "error" in outcome:
        raise outcome["error"]


def prepare(manifest: str | Path, out_dir: str | Path, *, ratios: dict[str, float],
            shards: dict[str, int] | None = None,
            target_shard_bytes: int | None = None, max_side: int | None = None,
            threads: int | None = None, workers: int | None = None,
            max_failed_share: float = DEFAULT_MAX_FAILED_SHARE,
            max_quarantined_share: float = DEFAULT_MAX_FAILED_SHARE,
            policy: DownloadPolicy | None = None, previous_label_map: str | None = None,
            cache_dir: str | None = None, image_cache_dir: str | None = None,
            log: Log | None = None, bar: bool = False) -> dict:
    """Every step; `target_shard_bytes` None: the records stage's default."""
    from odapi_operators.core.data.label_map import build_label_map
    from odapi_operators.core.data.shard import DEFAULT_TARGET_SHARD_BYTES, write_shards

    out = Path(out_dir)
    fetched, verified = fetch_and_verify(manifest, out, max_side=max_side, threads=threads,
                                         workers=workers, max_failed_share=max_failed_share,
                                         max_quarantined_share=max_quarantined_share,
                                         policy=policy, log=log, bar=bar,
                                         image_cache_dir=image_cache_dir)
    label_map = build_label_map(verified["manifest"], out / "label_map",
                                previous=previous_label_map)
    records = write_shards(verified["manifest"], label_map["label_map"], out / "records",
                           ratios, shards,
                           target_shard_bytes=target_shard_bytes or DEFAULT_TARGET_SHARD_BYTES,
                           workers=workers, cache_dir=cache_dir, log=log)
    summary = {
        "ok": verified["ok"], "failed": fetched["failed"] + verified["failed"],
        "skipped": fetched["skipped"], "reused": fetched["reused"],
        "verify_reused": verified["reused"], "fetch_failed": fetched["failed"],
        "quarantined": verified["failed"], "requests": fetched["requests"],
        "splits": {k: v["images"] for k, v in records["splits"].items()},
        "records_cached": records["cached"], "data": str(out / "records"),
        "failures": fetched["failures"], "quarantine": verified["quarantine"],
        "label_map": label_map["label_map"],
    }
    storage.write_text(out / SUMMARY, json.dumps(summary, indent=2))
    return summary
