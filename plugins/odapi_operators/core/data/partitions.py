"""Images as partitions: a dataset version cut by image key into parts any worker prepares.

At Open Images scale one fetch task and one verify task are hours on one worker, and losing
that worker loses all of it. Cut into partitions, each is an Airflow mapped task of its own
(`prepare_partition`: fetch and verify, overlapped as in `prepare.fetch_and_verify`), so a run
spreads over every worker, and a lost worker costs one partition's retry:

    <run>/partitions/plan.json                           count, sizes and the plan's tag
    <run>/partitions/part-00003-of-00008/manifest.jsonl  its records, in manifest order
    <run>/partitions/part-00003-of-00008/images/         its fetch folder (resume index, files)
    <run>/partitions/part-00003-of-00008/verify/         its verify folder
    <run>/verify/{manifest,quarantine,failures}.jsonl    all partitions joined, in their order
    <run>/records/<split>-00003-of-00008.tfrecord        its shards (`shard.write_partition`)

An image's partition is a hash of its key (other bits than its split's), so it does not depend
on what else the version holds or on who prepares it. Each record carries its position in the
version's manifest (`provenance["position"]`), which becomes its `image/source_id` whichever
worker writes it: the records do not depend on how the work was spread. Budgets (failed
downloads, quarantined images) are the run's, checked when partitions are joined: a partition
of a few images may lose them all while the run stays well within budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from odapi_operators.core import storage
from odapi_operators.core.budget import DEFAULT_MAX_FAILED_SHARE
from odapi_operators.core.data.manifest import ImageRecord, count_records, read_manifest
from odapi_operators.core.data.resume import sha256_of
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.progress import Log
from odapi_operators.core.rejections import StageError

if TYPE_CHECKING:
    from odapi_operators.core.data.download import DownloadPolicy

MAX_PARTITIONS = 1024  # Airflow's default [core] max_map_length: one mapped task each
OPEN_AT_ONCE = 256  # partition manifests written per pass over the version's manifest
PLAN = "plan.json"
POSITION = "position"  # provenance key: 1-based position in the version's manifest


def partition_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def partition_of(key: str, count: int) -> int:
    """The partition of image `key`: bytes 8-16 of its sha256 (`split_of` reads 0-8)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[8:16], "big") % count


def partition_count(images: int, partitions: int | None, partition_images: int | None) -> int:
    """`partitions`, else one per `partition_images` images; at least one, never more
    than images (an empty partition is a task with nothing to do) or MAX_PARTITIONS."""
    wanted = partitions or (math.ceil(images / partition_images) if partition_images else 1)
    return max(1, min(wanted, images, MAX_PARTITIONS))


def position_of(record: ImageRecord) -> int:
    """The record's 1-based position in its dataset version's manifest (set by the plan)."""
    try:
        return int(record.provenance[POSITION])
    except (KeyError, TypeError, ValueError):
        raise StageError(f"{record.key}: no manifest position; partition manifests come from "
                         "plan_partitions") from None


def plan_partitions(manifest: str | Path, out_dir: str | Path, *,
                    partitions: int | None = None, partition_images: int | None = None,
                    max_images: int | None = None) -> dict:
    """Write one manifest per partition under `out_dir` and `plan.json`; return the plan.

    The same manifest and count give the same plan, which is then kept as it is (a re-run
    rewrites nothing the partitions' tasks may be reading). `max_images`: refuse a larger
    manifest (the records' source-id space).
    """
    out = Path(out_dir)
    images = count_records(manifest)
    if max_images is not None and images >= max_images:
        raise StageError(f"{manifest}: {images} images exceed the source-id space "
                         f"({max_images})")
    count = partition_count(images, partitions, partition_images)
    tag = hashlib.sha256(f"{sha256_of(manifest)}:{count}".encode()).hexdigest()[:16]
    folders = [out / partition_name(index, count) for index in range(count)]
    kept = _current_plan(out, tag, folders)
    if kept:
        return kept
    sizes = [0] * count
    for first in range(0, count, OPEN_AT_ONCE):
        group = range(first, min(count, first + OPEN_AT_ONCE))
        with contextlib.ExitStack() as stack:
            files = {index: stack.enter_context(storage.atomic_write(
                folders[index] / "manifest.jsonl", "w")) for index in group}
            for position, record in enumerate(read_manifest(manifest), start=1):
                index = partition_of(record.key, count)
                if index in files:
                    placed = replace(record, provenance={**record.provenance, POSITION: position})
                    files[index].write(placed.to_json() + "\n")
                    sizes[index] += 1
    plan = {"tag": tag, "manifest": str(manifest), "images": images, "count": count,
            "partitions": [{"index": index, "count": count, "name": folder.name,
                            "folder": str(folder), "images": sizes[index]}
                           for index, folder in enumerate(folders)]}
    storage.write_text(out / PLAN, json.dumps(plan, indent=2))
    return plan


def _current_plan(out: Path, tag: str, folders: list[Path]) -> dict | None:
    try:
        plan = json.loads((out / PLAN).read_text())
    except (OSError, ValueError):
        return None
    if plan.get("tag") != tag or not all((f / "manifest.jsonl").is_file() for f in folders):
        return None
    return plan


def prepare_partition(folder: str | Path, *, max_side: int | None = None,
                      threads: int | None = None, workers: int | None = None,
                      policy: DownloadPolicy | None = None, cache_dir: str | None = None,
                      log: Log | None = None, bar: bool = False) -> dict:
    """Fetch and verify one partition into its folder (`images/`, `verify/`); resumable.

    A killed attempt's temporaries (of this host) are removed first; fetch and verify resume
    from their indexes, so a retry redoes only what the killed attempt had not finished.
    """
    from odapi_operators.core.data.prepare import fetch_and_verify

    out = Path(folder)
    swept = storage.sweep_temporaries(out)
    if swept and log:
        log(f"{out.name}: removed {swept} temporaries of an earlier, killed attempt")
    fetched, verified = fetch_and_verify(out / "manifest.jsonl", out, max_side=max_side,
                                         threads=threads, workers=workers, policy=policy,
                                         log=log, bar=bar, image_cache_dir=cache_dir,
                                         check_budgets=False)
    return {"manifest": verified["manifest"], "ok": verified["ok"],
            "fetch_failed": fetched["failed"], "quarantined": verified["failed"],
            "reused": fetched["reused"], "verify_reused": verified["reused"]}


def _prepared(partition: dict[str, Any]) -> tuple[dict, dict]:
    """The fetch and verify summaries of a prepared partition of this plan, else an error."""
    folder = Path(partition["folder"])
    try:
        fetched = json.loads((folder / "images" / SUMMARY).read_text())
        verified = json.loads((folder / "verify" / SUMMARY).read_text())
    except (OSError, ValueError):
        fetched = verified = None
    if not fetched or not verified or fetched["total"] != partition["images"] \
            or verified["total"] != fetched["ok"]:
        raise StageError(f"partition {partition['name']} is not prepared ({folder}): run "
                         "prepare_partition for it before joining")
    return fetched, verified


def _concatenate(paths: list[Path], target: Path) -> None:
    with storage.atomic_write(target) as out:
        for path in paths:
            if path.exists():
                with open(path, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)


def join_partitions(partitions: list[dict[str, Any]], out_dir: str | Path, *,
                    max_failed_share: float = DEFAULT_MAX_FAILED_SHARE,
                    max_quarantined_share: float = DEFAULT_MAX_FAILED_SHARE) -> dict:
    """The run's verified manifest, quarantine and fetch failures: the partitions' in their
    order, copied as bytes (no parsing); then the run's budgets, as fetch and verify check
    them in one task. Returns the summary (written to `out_dir/summary.json` first)."""
    from odapi_operators.core.data.fetch import check_fetch_budget
    from odapi_operators.core.data.verify import check_verify_budget

    out = Path(out_dir)
    done = [_prepared(partition) for partition in partitions]
    folders = [Path(p["folder"]) for p in partitions]
    paths = {"manifest": out / "manifest.jsonl", "quarantine": out / "quarantine.jsonl",
             "failures": out / "failures.jsonl"}
    _concatenate([f / "verify" / "manifest.jsonl" for f in folders], paths["manifest"])
    _concatenate([f / "verify" / "quarantine.jsonl" for f in folders], paths["quarantine"])
    _concatenate([f / "images" / "failures.jsonl" for f in folders], paths["failures"])
    total = {key: sum(fetched[key] for fetched, _ in done) for key in ("total", "ok", "failed")}
    verified = {key: sum(v.get(key, 0) for _, v in done)
                for key in ("ok", "failed", "boxes_quarantined", "reused")}
    summary = {**{k: str(v) for k, v in paths.items()}, **verified,
               "skipped": sum(v["skipped"] for _, v in done), "partitions": len(partitions),
               "images": total["total"], "fetched": total["ok"], "fetch_failed": total["failed"],
               "max_failed_share": max_failed_share,
               "max_quarantined_share": max_quarantined_share}
    storage.write_text(out / SUMMARY, json.dumps(summary, indent=2))
    check_fetch_budget(total["ok"], total["failed"], total["total"], max_failed_share,
                       summary["failures"])
    check_verify_budget(verified["ok"], verified["failed"], max_quarantined_share,
                        summary["quarantine"])
    return summary
