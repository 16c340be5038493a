"""Records stage: verified manifest -> sharded TFRecords per split, OD API / TF-Vision keys.

Streaming: the manifest is read line by line and each Example is written as soon as it is
encoded, so memory does not grow with the dataset. Shard counts come from a target shard size
(`plan_shards`) unless given. Shards are spread over worker processes (`write_shards`) or over
Airflow mapped tasks (`write_shard`, then `finish_shards`); each worker streams the manifest
once for all of its shards. With images as partitions (`partitions.py`), each partition's task
writes that partition as one shard of each split (`write_partition`, then
`finish_partitions`). Each shard is written to a temporary name and renamed when complete,
then its stats file is written: a killed task leaves no partial shard, and the re-run writes
only the shards without stats. The finished folder is reused, not rewritten, for the
same inputs; with `cache_dir`, any later run with the same content fingerprint links the
cached shards instead of writing them, and a run over another version takes its unchanged
images' Examples from the shards the cache got last (`examples.py`), byte for byte what
encoding them again would give.

`image/source_id` must be a small decimal integer (TF-Vision's eval parser converts it with
`tf.strings.to_number` to int64 via float32): ids are the records' 1-based positions in the
dataset version's manifest (image-key order; a partition's records carry theirs) and the
mapping back to image keys is kept in `source_ids.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections import Counter, deque
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from odapi_operators.core import storage
from odapi_operators.core.data.examples import (
    LATEST,
    STATS_DIR,
    EarlierExamples,
    example_for,
    identity,
    latest,
    list_line,
    list_path,
)
from odapi_operators.core.data.label_map import read_label_map
from odapi_operators.core.data.manifest import ImageRecord, read_manifest
from odapi_operators.core.data.partitions import position_of
from odapi_operators.core.data.resume import sha256_of
from odapi_operators.core.data.split import split_of
from odapi_operators.core.data.tfrecord import write_record
from odapi_operators.core.failures import Failure
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.progress import Log
from odapi_operators.core.rejections import StageError
from odapi_operators.core.stages.child import process_pool

MAX_SOURCE_ID = 2**22
DEFAULT_TARGET_SHARD_BYTES = 128 << 20
WINDOW = 256  # Examples held for shard order behind one still encoding
RECORD_OVERHEAD = 256  # bytes an Example adds to its image, for shard sizing


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


# --- planning ----------------------------------------------------------------------------

def _content_of(record: ImageRecord) -> str:
    """The image's content hash from upstream stages; its file stamp otherwise."""
    sha = record.provenance.get("sha256")
    if sha:
        return sha
    st = os.stat(record.source.uri)
    return f"{record.source.uri}:{st.st_size}:{st.st_mtime_ns}"


def plan_shards(manifest: str | Path, label_map_path: str | Path, ratios: dict[str, float],
                shards: dict[str, int] | None = None,
                target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES) -> dict:
    """Shard counts per split and the dataset's content fingerprint, from one streaming pass.

    `shards` fixes the counts (a split at 0 is not written); otherwise every split gets
    ceil(its bytes / `target_shard_bytes`) shards, at least one. The returned `shards` list is
    what Airflow maps `write_shard` over.
    """
    images: Counter = Counter()
    sizes: Counter = Counter()
    content = hashlib.sha256()
    label_map_text = storage.read_text(label_map_path)
    for record in read_manifest(manifest):
        split = split_of(record.key, ratios)
        images[split] += 1
        if shards is None:
            sizes[split] += os.path.getsize(record.source.uri) + RECORD_OVERHEAD
        content.update(json.dumps([record.key, record.source_id, record.width, record.height,
                                   [list(b.__dict__.values()) for b in record.boxes],
                                   _content_of(record)]).encode())
    total = sum(images.values())
    if total >= MAX_SOURCE_ID:
        raise ValueError(f"{manifest}: {total} images exceed the source-id space "
                         f"({MAX_SOURCE_ID})")
    if shards is not None:
        counts = {split: int(n) for split, n in shards.items() if n > 0}
    else:
        counts = {split: max(1, math.ceil(sizes[split] / target_shard_bytes)) for split in ratios}
    content.update(json.dumps([label_map_text, sorted(ratios.items()),
                               sorted(counts.items())]).encode())
    return {"counts": counts, "images": dict(images), "fingerprint": content.hexdigest()[:16],
            "tag": _tag(manifest, label_map_path, ratios, counts),
            "shards": [{"split": s, "index": i, "count": n}
                       for s, n in counts.items() for i in range(n)]}


def _tag(manifest: str | Path, label_map_path: str | Path, ratios: dict[str, float],
         counts: dict[str, int]) -> str:
    """Identity of one shard layout of one manifest: shards with another tag are stale."""
    settings = json.dumps([storage.read_text(label_map_path), sorted(ratios.items()),
                           sorted(counts.items())])
    return hashlib.sha256((sha256_of(manifest) + settings).encode()).hexdigest()[:16]


# --- writing -----------------------------------------------------------------------------

def _stats_path(out: Path, name: str) -> Path:
    return out / STATS_DIR / f"{name}.json"


def _finished(out: Path, name: str, tag: str) -> dict | None:
    """The stats of a complete shard of this layout, else None."""
    try:
        stats = json.loads(_stats_path(out, name).read_text())
        if stats["tag"] == tag and (out / name).stat().st_size == stats["bytes"]:
            return stats
    except (OSError, ValueError, KeyError):
        pass
    return None


def _records_of(manifest: str | Path, ratios: dict[str, float],
                counts: dict[str, int]) -> Iterator[tuple[int, str, int, ImageRecord]]:
    """(source_id, split, shard index, record): round-robin within each split, manifest order."""
    seen: Counter = Counter()
    for source_id, record in enumerate(read_manifest(manifest), start=1):
        split = split_of(record.key, ratios)
        if split in counts:
            yield source_id, split, seen[split] % counts[split], record
            seen[split] += 1


def _partition_records(manifest: str | Path, ratios: dict[str, float], partition: int
                       ) -> Iterator[tuple[int, str, int, ImageRecord]]:
    """(source_id, split, shard index, record) of one partition's manifest: the record's
    position in the whole version's manifest, and the partition's own shard of each split."""
    for record in read_manifest(manifest):
        yield position_of(record), split_of(record.key, ratios), partition, record


def _write_group(manifest: str, label_map_path: str, out_dir: str, ratios: dict[str, float],
                 counts: dict[str, int], members: list[tuple[str, int]], tag: str,
                 partition: int | None = None, reuse_from: tuple[str, list[str]] | None = None,
                 encoders: int = 1) -> list[dict]:
    """Write the shards `members` in one pass over the manifest (a partition's manifest,
    given `partition`: it is the index of every shard it writes), each with its list of
    Examples; return their stats (plus how many Examples came from `reuse_from`, an earlier
    records folder and its shards: `examples.py`). Examples not reused are encoded here, or
    with `encoders` > 1 in that many processes, started by the first one needed."""
    out = Path(out_dir)
    label_map = read_label_map(label_map_path)
    names = {(s, i): shard_name(s, i, counts[s]) for s, i in members}
    for name in names.values():  # temporaries a killed run of these shards left behind
        for stale in [*out.glob(f".tmp-{name}-*"),
                      *(out / STATS_DIR).glob(f".tmp-{name}.examples-*")]:
            stale.unlink(missing_ok=True)
    stats = {member: {"split": member[0], "shard": name, "tag": tag, "images": 0, "boxes": 0,
                      "bytes": 0, "per_class": Counter()} for member, name in names.items()}
    current = ""
    earlier = EarlierExamples(*reuse_from) if reuse_from else None
    encoding = _Encoding(encoders, label_map)
    window: deque[tuple[tuple[str, int], ImageRecord, int, str | None, bytes | Future]] = deque()
    in_flight = 0

    def put(member: tuple[str, int], record: ImageRecord, source_id: int, ident: str | None,
            example: bytes | Future) -> None:
        nonlocal current
        current = names[member]
        example = example.result() if isinstance(example, Future) else example
        shard = stats[member]
        lists[member].write(list_line(record.key, ident, shard["bytes"], len(example),
                                      source_id))
        shard["bytes"] += write_record(files[member], example)
        shard["images"] += 1
        shard["boxes"] += len(record.boxes)
        shard["per_class"].update(b.label for b in record.boxes)

    try:
        with contextlib.ExitStack() as stack:
            stack.callback(encoding.close)
            if earlier:
                stack.callback(earlier.close)
            files = {member: stack.enter_context(storage.atomic_write(out / name))
                     for member, name in names.items()}
            lists = {member: stack.enter_context(storage.atomic_write(
                list_path(out, name), "w", durable=False)) for member, name in names.items()}
            placed = _records_of(manifest, ratios, counts) if partition is None \
                else _partition_records(manifest, ratios, partition)
            for source_id, split, index, record in placed:
                member = (split, index)
                if member not in files:
                    continue
                ident = identity(record, label_map)
                example = earlier.example(record, ident, source_id) if earlier else None
                window.append((member, record, source_id, ident,
                               example or encoding.example(record, source_id)))
                in_flight += isinstance(window[-1][4], Future)
                # written in manifest order; only encodes in flight (and the window) bounded
                while window and (not isinstance(head := window[0][4], Future) or head.done()
                                  or in_flight > 4 * encoders or len(window) > WINDOW):
                    in_flight -= isinstance(head, Future)
                    put(*window.popleft())
            while window:
                put(*window.popleft())
            current = "closing shards"
    except OSError as exc:
        raise StageError(f"shard: writing {out / current if current else out} failed: "
                         f"{exc.strerror or exc}", Failure.TRANSIENT) from None
    results = []
    for shard in stats.values():
        shard["per_class"] = dict(shard["per_class"])
        storage.write_text(_stats_path(out, shard["shard"]), json.dumps(shard))
        results.append(shard)
    if results and earlier:
        results[0]["reused"] = earlier.reused  # the group's count: not in the stats file
    return results


class _Encoding:
    """Examples encoded here, or with `workers` > 1 in a process pool started by the first
    one (a layout reusing every Example starts none)."""

    def __init__(self, workers: int, label_map: dict[str, int]):
        self.workers, self.label_map = workers, label_map
        self.pool: Executor | None = None

    def example(self, record: ImageRecord, source_id: int) -> bytes | Future:
        if self.workers <= 1:
            return example_for(record, source_id, self.label_map)
        if self.pool is None:
            self.pool = process_pool(self.workers)
        return self.pool.submit(example_for, record, source_id, self.label_map)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


def write_shard(manifest: str | Path, label_map_path: str | Path, out_dir: str | Path,
                ratios: dict[str, float], split: str, index: int, count: int,
                counts: dict[str, int] | None = None) -> dict:
    """Write shard `index` of `count` of `split` (one Airflow mapped task); return its stats.

    `counts` is the whole layout (`plan_shards(...)["counts"]`); it defaults to this split
    alone, which is enough to place the records but marks the stats for that layout only.
    """
    counts = counts or {split: count}
    if counts.get(split) != count:
        raise ValueError(f"shard {split} {index}/{count} does not match counts {counts}")
    out = Path(out_dir)
    tag = _tag(manifest, label_map_path, ratios, counts)
    done = _finished(out, shard_name(split, index, count), tag)
    if done:
        return done
    out.mkdir(parents=True, exist_ok=True)
    [stats] = _write_group(str(manifest), str(label_map_path), str(out), ratios, counts,
                           [(split, index)], tag)
    return stats


def finish_shards(manifest: str | Path, label_map_path: str | Path, out_dir: str | Path,
                  ratios: dict[str, float], counts: dict[str, int],
                  fingerprint: str | None = None) -> dict:
    """After every shard is written: per-split stats, source_ids.json and summary.json."""
    out = Path(out_dir)
    tag = _tag(manifest, label_map_path, ratios, counts)
    splits = _split_stats(out, counts, lambda index: tag)
    _write_source_ids(out, ((source_id, split, record) for source_id, split, _, record
                            in _records_of(manifest, ratios, counts)))
    return _write_summary(out, label_map_path, splits, tag, fingerprint)


def _split_stats(out: Path, counts: dict[str, int], tag_of: Callable[[int], str]) -> dict:
    """Per-split totals from the shards' stats (shard `index` of a layout tagged
    `tag_of(index)`), written as `<split>.stats.json`; shards of other layouts are removed."""
    splits: dict[str, dict] = {}
    for split, count in counts.items():
        per_class: Counter = Counter()
        total = {"images": 0, "boxes": 0, "bytes": 0}
        for index in range(count):
            stats = _finished(out, shard_name(split, index, count), tag_of(index))
            if stats is None:
                raise StageError(f"shard: {out / shard_name(split, index, count)} is missing "
                                 "or incomplete; write it before finishing")
            for key in total:
                total[key] += stats[key]
            per_class.update(stats["per_class"])
        splits[split] = {**total, "per_class": dict(per_class), "shards": count,
                         "pattern": str(out / f"{split}-*.tfrecord")}
        storage.write_text(out / f"{split}.stats.json", json.dumps(splits[split], indent=2))
    wanted = {shard_name(s, i, n) for s, n in counts.items() for i in range(n)}
    for path in out.glob("*-?????-of-?????.tfrecord"):
        if path.name not in wanted:  # a previous layout's shard would match the pattern
            path.unlink()
    return splits


def _write_source_ids(out: Path, entries: Iterable[tuple[int, str, ImageRecord]]) -> None:
    """source_ids.json: each record's `image/source_id` -> its key, split and source id."""
    with storage.atomic_write(out / "source_ids.json", "w") as fh:
        fh.write("{")
        for n, (source_id, split, record) in enumerate(entries):
            entry = {"key": record.key, "split": split, "source_id": record.source_id}
            fh.write(("," if n else "") + f'"{source_id}":' + json.dumps(entry))
        fh.write("}")


def _write_summary(out: Path, label_map_path: str | Path, splits: dict, tag: str,
                   fingerprint: str | None, **extra: Any) -> dict:
    label_map = read_label_map(label_map_path)
    summary = {"splits": splits, "label_map": str(label_map_path),
               "num_classes": max(label_map.values()), "tag": tag,
               "fingerprint": fingerprint, **extra}
    storage.write_text(out / SUMMARY, json.dumps(summary, indent=2))
    return summary


# --- images as partitions (data/partitions.py): one shard per split and partition -----------

def _partition_layout(ratios: dict[str, float], count: int) -> dict[str, int]:
    return {split: count for split in ratios}


def write_partition(manifest: str | Path, label_map_path: str | Path, out_dir: str | Path,
                    ratios: dict[str, float], index: int, count: int) -> list[dict]:
    """Write partition `index` of `count` (its verified `manifest`) as shard `index` of
    every split (one Airflow mapped task); return their stats. Finished shards of the same
    manifest and label map are kept, so a retry writes only what its killed attempt had not.
    """
    out = Path(out_dir)
    counts = _partition_layout(ratios, count)
    tag = _tag(manifest, label_map_path, ratios, counts)
    done, todo = [], []
    for split in counts:
        stats = _finished(out, shard_name(split, index, count), tag)
        if stats:
            done.append(stats)
        else:
            todo.append((split, index))
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        done += _write_group(str(manifest), str(label_map_path), str(out), ratios, counts,
                             todo, tag, partition=index)
    return done


def finish_partitions(manifest: str | Path, partition_manifests: list[str | Path],
                      label_map_path: str | Path, out_dir: str | Path,
                      ratios: dict[str, float]) -> dict:
    """After every partition's shards: per-split stats, source_ids.json (from the joined
    verified `manifest`) and summary.json, as `finish_shards` writes them."""
    out = Path(out_dir)
    counts = _partition_layout(ratios, len(partition_manifests))
    tags = [_tag(m, label_map_path, ratios, counts) for m in partition_manifests]
    splits = _split_stats(out, counts, tags.__getitem__)
    _write_source_ids(out, ((position_of(record), split_of(record.key, ratios), record)
                            for record in read_manifest(manifest)))
    tag = hashlib.sha256(" ".join(tags).encode()).hexdigest()[:16]
    return _write_summary(out, label_map_path, splits, tag, None,
                          partitions=len(partition_manifests))


def _groups(members: list[tuple[str, int]], workers: int) -> list[list[tuple[str, int]]]:
    groups = [members[i::workers] for i in range(workers)]
    return [g for g in groups if g]


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of `source` into `target` (copy across filesystems)."""
    for path in source.rglob("*"):
        if path.is_file():
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            try:
                os.link(path, dest)
            except OSError:
                shutil.copy2(path, dest)


def _current_summary(out: Path, tag: str) -> dict | None:
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    if summary.get("tag") != tag:
        return None
    for split, stats in summary["splits"].items():
        for index in range(stats["shards"]):
            if _finished(out, shard_name(split, index, stats["shards"]), tag) is None:
                return None
    return summary


def write_shards(manifest: str | Path, label_map_path: str | Path, out_dir: str | Path,
                 ratios: dict[str, float], shards: dict[str, int] | None = None, *,
                 target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES,
                 workers: int | None = None, cache_dir: str | Path | None = None,
                 log: Log | None = None) -> dict:
    """Write `<split>-NNNNN-of-NNNNN.tfrecord` files plus per-split stats; return the summary.

    `shards` fixes shard counts per split; None sizes them by `target_shard_bytes`.
    """
    out = Path(out_dir)
    plan = plan_shards(manifest, label_map_path, ratios, shards, target_shard_bytes)
    counts, tag = plan["counts"], plan["tag"]
    shard_total = len(plan["shards"])
    current = _current_summary(out, tag)
    if current:
        return _counted(current, cached=True, written=0, total=shard_total)
    cached = Path(cache_dir) / plan["fingerprint"] if cache_dir else None
    if cached and (cached / SUMMARY).exists():
        _link_tree(cached, out)
        # the cached files were written for another manifest path: re-stamp this layout
        for stats_file in (out / STATS_DIR).glob("*.json"):
            stats = json.loads(stats_file.read_text())
            storage.write_text(stats_file, json.dumps({**stats, "tag": tag}))
        summary = finish_shards(manifest, label_map_path, out, ratios, counts,
                                plan["fingerprint"])
        _publish_latest(cached)
        return _counted(summary, cached=True, written=0, total=shard_total)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(s["split"], s["index"]) for s in plan["shards"]
            if _finished(out, shard_name(s["split"], s["index"], s["count"]), tag) is None]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    args = (str(manifest), str(label_map_path), str(out), ratios, counts)
    reuse_from = _layout(latest(cache_dir))
    if reuse_from and todo:  # mostly copies: one pass here, other processes only to encode
        results = [_write_group(*args, todo, tag, None, reuse_from, encoders=workers)]
    else:
        groups = _groups(todo, workers)
        with contextlib.ExitStack() as stack:
            if workers > 1:
                pool = stack.enter_context(process_pool(workers))
                results = [f.result() for f in [pool.submit(_write_group, *args, g, tag)
                                                for g in groups]]
            else:
                results = [_write_group(*args, g, tag) for g in groups]
    for stats in (s for group in results for s in group):
        if log:
            log(f"shard: {stats['shard']} written ({stats['images']} images, "
                f"{stats['bytes'] / 1e6:.1f} MB)")
    summary = finish_shards(manifest, label_map_path, out, ratios, counts, plan["fingerprint"])
    if cached:
        with contextlib.suppress(storage.StorageError):  # another run published it meanwhile
            with storage.atomic_directory(cached, replace=False) as tmp:
                _link_tree(out, tmp)
        _publish_latest(cached)
    reused = sum(s.get("reused", 0) for group in results for s in group)
    return _counted(summary, cached=False, written=len(todo), total=shard_total,
                    reused_images=reused)


def _layout(folder: str | None) -> tuple[str, list[str]] | None:
    """A finished records folder and its shards' names, from its summary."""
    try:
        splits = json.loads((Path(folder) / SUMMARY).read_text())["splits"] if folder else None
        return (folder, [shard_name(split, index, stats["shards"]) for split, stats
                         in splits.items() for index in range(stats["shards"])]) \
            if splits else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _publish_latest(cached: Path) -> None:
    """Point the records cache's `latest` at `cached`: the next layout reuses its Examples."""
    with contextlib.suppress(OSError), \
            storage.atomic_write(cached.parent / LATEST, "w", durable=False) as fh:
        fh.write(cached.name)


def _counted(summary: dict, cached: bool, written: int, total: int, **extra: Any) -> dict:
    """The CLI's common counts: images in shards, shards written and reused."""
    return {**summary, "ok": sum(s["images"] for s in summary["splits"].values()), "failed": 0,
            "cached": cached, "written": written, "skipped": total - written, **extra}
