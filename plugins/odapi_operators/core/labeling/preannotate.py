"""Pre-annotation stage: the production model proposes boxes on unlabeled images, active
learning picks the next labeling batch, and the batch is written as Prodigy or Label Studio
tasks.

    pool (folder | gs:// prefix | URL list) --pool--> readable images (fetched if remote)
      -> skip images already sent (sent ledger) or already labeled (--labeled)
      -> model in batches (local SavedModel or TF Serving; a candidate model too, if given)
      -> informativeness, rank, diversity guard, top K          (core/selection)
      -> claim in the sent ledger -> tasks + scores.jsonl + summary.json in `out_dir`

The batch folder is written atomically; a re-run into the same folder (a task retry) gets
the images its earlier attempt claimed, never a second copy of anyone else's.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from odapi_operators.core import storage
from odapi_operators.core.labeling import annotation_tasks
from odapi_operators.core.labeling.annotation_tasks import Proposal
from odapi_operators.core.labeling.pool import Pool, PoolImage, fetch_remote, list_pool, read_pool
from odapi_operators.core.labeling.predictors import Predictor
from odapi_operators.core.labeling.selection import (
    SelectionPolicy,
    informativeness,
    pick_diverse,
    rank,
)
from odapi_operators.core.labeling.sent_ledger import (
    SentLedger,
    came_back,
    entry_identities,
    identities,
    labeled_identities,
)
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.rejections import StageError

SCORES_FILE = "scores.jsonl"


@dataclass(frozen=True)
class PreannotateOptions:
    fmt: str = "prodigy"              # prodigy | labelstudio
    top_k: int | None = None          # None: every image that passes the guards
    score_threshold: float = 0.3      # lowest score of a proposed box
    max_boxes: int = 20               # most proposed boxes per image
    batch_size: int = 8               # images per model call
    inline_images: bool = True        # Prodigy: local and gs:// images as data URIs
    selection: SelectionPolicy = field(default_factory=SelectionPolicy)


@dataclass(frozen=True)
class Scored:
    """One scored pool image: where it is, how to name it, what the model proposes."""

    key: str
    uri: str          # origin: pool path, URL or gs://
    reference: str    # how annotation tools name it (pool-relative path or URL)
    local: bool       # the pool image is a local file
    path: str         # local copy of the bytes
    sha256: str
    dhash: int
    width: int
    height: int
    proposals: tuple[Proposal, ...]
    parts: dict       # informativeness components and `score`

    @property
    def score(self) -> float:
        return self.parts["score"]

    def ledger_entry(self, model_version: str, batch: str) -> dict:
        return {"key": self.key, "sha256": self.sha256, "uri": self.uri,
                "dhash": f"{self.dhash:016x}", "model_version": model_version, "batch": batch,
                "score": self.score}


def proposals(found, labels: dict[int, str], threshold: float,
              max_boxes: int) -> tuple[Proposal, ...]:
    """Detections at or above `threshold`, best first, at most `max_boxes` (ties by index)."""
    order = sorted(range(len(found.scores)), key=lambda i: (-float(found.scores[i]), i))
    kept = []
    for i in order[:max_boxes] if max_boxes else order:
        if float(found.scores[i]) < threshold:
            break
        ymin, xmin, ymax, xmax = (float(v) for v in found.boxes[i])
        if xmax <= xmin or ymax <= ymin:
            continue  # degenerate: nothing to draw
        class_id = int(found.classes[i])
        kept.append(Proposal(labels.get(class_id, f"class_{class_id}"), float(found.scores[i]),
                             xmin, ymin, xmax, ymax))
    return tuple(kept)


def _batches(items: Iterable[PoolImage], size: int) -> Iterator[list[PoolImage]]:
    """Batches of `size` images of one pixel size (a model batch must share it).

    Images wait in one bucket per size; at most 4 batches' worth wait, then the fullest
    bucket goes, so a pool of many sizes still flows (in smaller batches).
    """
    buckets: dict[tuple[int, int], list[PoolImage]] = {}
    waiting = 0
    for item in items:
        bucket = buckets.setdefault((item.width, item.height), [])
        bucket.append(item)
        waiting += 1
        if len(bucket) < size and waiting < 4 * size:
            continue
        full = (item.width, item.height) if len(bucket) >= size else max(
            buckets, key=lambda shape: len(buckets[shape]))
        waiting -= len(buckets[full])
        yield buckets.pop(full)
    yield from buckets.values()


def score_images(images: Iterable[PoolImage], predictor: Predictor,
                 candidate: Predictor | None, options: PreannotateOptions,
                 skip: Callable[[PoolImage], str | None] = lambda image: None,
                 ) -> tuple[list[Scored], Counter, float]:
    """(scored images, skip reasons counted, seconds spent reading and predicting)."""
    labels = predictor.ref.labels()
    scored: list[Scored] = []
    skipped: Counter = Counter()
    started = time.monotonic()

    def unskipped() -> Iterator[PoolImage]:
        for image in images:
            reason = skip(image)
            if reason:
                skipped[reason] += 1
            else:
                yield image

    for fresh in _batches(unskipped(), max(1, options.batch_size)):
        found = predictor.predict([i.model_bytes for i in fresh])
        other = (candidate.predict([i.model_bytes for i in fresh]) if candidate
                 else [None] * len(fresh))
        for image, production, second in zip(fresh, found, other):
            record = image.record
            scored.append(Scored(
                key=image.key, uri=image.uri, reference=record.source_id,
                local="://" not in image.uri, path=record.source.uri, sha256=image.sha256,
                dhash=image.dhash, width=image.width, height=image.height,
                proposals=proposals(production, labels, options.score_threshold,
                                    options.max_boxes),
                parts=informativeness(production, second, options.score_threshold,
                                      options.selection)))
    return scored, skipped, time.monotonic() - started


def build_task(item: Scored, fmt: str, model_version: str, inline_images: bool) -> dict:
    """The annotation task of one selected image."""
    meta = {"key": item.key}
    if fmt == "labelstudio":
        image = annotation_tasks.labelstudio_image(item.reference, item.local)
        return annotation_tasks.labelstudio_task(image, item.width, item.height, item.proposals,
                                                 model_version, item.score, meta=meta)
    remote_url = item.uri.startswith(("http://", "https://"))
    if inline_images and not remote_url:
        image = annotation_tasks.data_uri(storage.read_bytes(item.path))
        return annotation_tasks.prodigy_task(image, item.width, item.height, item.proposals,
                                             model_version, item.score, path=item.reference,
                                             meta=meta)
    return annotation_tasks.prodigy_task(item.reference, item.width, item.height, item.proposals,
                                         model_version, item.score, meta=meta)


def _score_line(rank_index: int, item: Scored, status: str) -> str:
    return json.dumps({"rank": rank_index, "key": item.key, "uri": item.uri, "status": status,
                       "sha256": item.sha256, "dhash": f"{item.dhash:016x}",
                       "boxes": len(item.proposals), **item.parts}, sort_keys=True)


def _labeled(labeled: Sequence[str], listing: Pool, fetched: dict[str, str]) -> set[str]:
    """Identities of the labeled images; only files the size of a pool image are hashed."""
    if not labeled:
        return set()
    paths = [r.source.uri for r in listing.records if r.source.kind == "local"]
    sizes = {os.path.getsize(p) for p in [*paths, *fetched.values()] if os.path.isfile(p)}
    return set().union(*(labeled_identities(path, images_root=listing.root, sizes=sizes)
                         for path in labeled))


def default_ledger(out_dir: str | os.PathLike[str], model_name: str) -> str:
    """`sent-<model>.jsonl` beside the batch folder: one ledger across batches."""
    return str(Path(os.fspath(out_dir)).resolve().parent / f"sent-{model_name}.jsonl")


def preannotate(pool: str, out_dir: str | os.PathLike[str], predictor: Predictor, *,
                candidate: Predictor | None = None, labeled: Sequence[str] = (),
                sent_ledger: str | None = None, cache_dir: str | None = None,
                options: PreannotateOptions = PreannotateOptions(), download_policy=None,
                ) -> dict:
    """Score `pool` with `predictor`, write the next labeling batch to `out_dir`; summary.

    `labeled`: manifests, ingest folders or exports whose images count as labeled.
    """
    if options.fmt not in annotation_tasks.FORMATS:
        raise ValueError(f"format {options.fmt!r} not one of {annotation_tasks.FORMATS}")
    ref = predictor.ref
    if not ref.labels():
        raise ValueError(f"{ref.model_version}: no label map (give one for a Serving URL)")
    started = time.monotonic()
    out = Path(os.fspath(out_dir)).resolve()
    batch = str(out)
    ledger = SentLedger(sent_ledger or default_ledger(out, ref.name))
    earlier = [r for r in ledger.records(ref.name) if r.get("batch") != batch]
    sent_ids = set().union(*(entry_identities(r) for r in earlier))

    listing = list_pool(pool)
    fetched = fetch_remote(listing, cache_dir or out.parent / "pool-cache", download_policy)
    labeled_ids = _labeled(labeled, listing, fetched)

    def skip(image: PoolImage) -> str | None:
        ids = identities(image.key, image.sha256, image.uri)
        if ids & sent_ids:
            return "sent"
        return "labeled" if ids & labeled_ids else None

    scored, skipped, seconds = score_images(read_pool(listing, fetched), predictor, candidate,
                                            options, skip)
    ranked = rank(scored, lambda s: s.score, lambda s: s.key)
    seen = [int(r["dhash"], 16) for r in earlier if r.get("dhash")]
    chosen, near = pick_diverse(ranked, options.top_k, lambda s: s.dhash, seen,
                                options.selection.max_hamming)
    skipped["near_duplicate"] += len(near)
    with storage.atomic_directory(out) as tmp:
        claimed = {e["key"] for e in ledger.claim(
            ref.name, batch, [s.ledger_entry(ref.model_version, batch) for s in chosen])}
        skipped["sent"] += sum(s.key not in claimed for s in chosen)  # a concurrent run won
        selected = [s for s in chosen if s.key in claimed]
        tasks = [build_task(s, options.fmt, ref.model_version, options.inline_images)
                 for s in selected]
        files = [annotation_tasks.write_tasks(tmp, options.fmt, tasks)]
        status = {s.key: "selected" for s in selected} | {s.key: "near_duplicate" for s in near}
        lines = [_score_line(i, s, status.get(s.key, "not_selected"))
                 for i, s in enumerate(ranked, 1)]
        storage.write_text(tmp / SCORES_FILE, "".join(line + "\n" for line in lines))
        files.append(str(tmp / SCORES_FILE))
        summary = {
            "model": ref.name, "model_version": ref.model_version,
            "candidate": candidate.ref.model_version if candidate else None,
            "inference": "serving" if ref.serving else "local", "pool": str(pool),
            "images": len(listing.records), "failed": len(listing.rejected),
            "scored": len(scored), "selected": len(selected),
            "skipped": {k: skipped.get(k, 0) for k in ("sent", "labeled", "near_duplicate")},
            "boxes": sum(len(s.proposals) for s in selected), "format": options.fmt,
            "top_k": options.top_k, "score_threshold": options.score_threshold,
            "max_boxes": options.max_boxes, "out": batch, "sent_ledger": ledger.path,
            "files": [str(out / Path(f).name) for f in files] + [str(out / SUMMARY)],
            "scoring_seconds": round(seconds, 3),
            "images_per_s": round(len(scored) / seconds, 2) if seconds and scored else None,
            "seconds": round(time.monotonic() - started, 3),
            "failures": [str(r) for r in listing.rejected.items[:20]],
        }
        if labeled:
            summary["came_back"] = came_back(ledger.records(ref.name), labeled_ids)
        storage.write_text(tmp / SUMMARY, json.dumps(summary, indent=2))
    if listing.records and not scored and not sum(skipped.values()):
        raise StageError(f"{pool}: no image could be read; see {out / 'summary.json'}")
    return summary
