"""Data stages, declared once: exports -> manifest -> images -> verified images -> records.

Each declaration names its inputs, its options section, its run folder and its result; the
function body only maps them onto the stage's core function. Implementations are imported
inside the functions, so declaring (and parsing a DAG) stays free of PIL and process pools.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from odapi_operators.core.config import ExportsConfig, ImagesConfig, RecordsConfig
from odapi_operators.core.failures import StageSkipped
from odapi_operators.core.layout import Stage
from odapi_operators.core.stages.contract import Inputs, Result, StageContext, StageSpec
from odapi_operators.core.wording import setting


def _production_label_map(ctx: StageContext) -> str | None:
    """The label map of the model in production, whose class ids a run must keep."""
    if ctx.pipeline is None:
        return None
    from odapi_operators.core.serving.serving_dir import production_label_map

    return production_label_map(ctx.pipeline.serving.base, ctx.pipeline.serving.model_name)


# --- select_exports ---------------------------------------------------------------------

class Candidates(Inputs):
    candidates: list[str] = Field(description="complete exports found by the sensor")


class Selected(Result):
    items = "exports"
    log_format = "run consumes these exports: {exports}"

    exports: list[str]


def select(ctx: StageContext, inputs: Candidates, options: ExportsConfig) -> Selected:
    """Through the ledger, exactly once per export: a scheduled or manual run takes what no
    run consumed (or everything, `run.take_exports: all`), a backfill run what landed in its
    data interval, a re-run what it took before. Nothing to take skips the run."""
    from odapi_operators.core.data.ledger import select_exports

    run = ctx.pipeline.run if ctx.pipeline else None
    interval = None
    if run and run.is_backfill and run.data_interval_start and run.data_interval_end:
        interval = (datetime.fromisoformat(run.data_interval_start),
                    datetime.fromisoformat(run.data_interval_end))
    take_all = bool(run and run.take_exports == "all" and interval is None)
    chosen = select_exports(options.ledger, ctx.run_id or "", list(inputs.candidates),
                            interval=interval, marker=options.marker, take_all=take_all)
    if not chosen:
        raise StageSkipped("no new complete export to consume")
    return Selected(exports=chosen)


SELECT_EXPORTS = StageSpec(
    name="select_exports", help="pick the exports this run consumes (the exports ledger)",
    inputs=Candidates, result=Selected, run=select, section="exports")


# --- ingest -------------------------------------------------------------------------------

class IngestInputs(Inputs):
    exports: list[str] = Field(description="export folders or files (companion files are "
                                           "just more inputs)",
                               json_schema_extra={"positional": True})
    label_map: str | None = Field(default=None, description="existing label_map.pbtxt whose "
                                  "ids are kept (default: the production model's)")


class Ingested(Result):
    """The run's dataset version: the whole of it (what fetch, verify and records take) and
    how it differs from its parent (`diff`: diff.json, whose added + changed keys are the
    images new to this version)."""

    manifest: str
    label_map: str
    rejections: str
    images: int
    boxes: int
    rejected: int
    fingerprint: str
    new_version: bool | None = None
    version: str | None = None  # <datasets>/<fingerprint>, with a datasets folder
    diff: str
    parent: str | None = None
    added: int = 0
    changed: int = 0
    removed: int = 0

    def log_line(self) -> str:
        parent = f"version {self.parent}" if self.parent else "no parent"
        return (f"ingested {self.images} images, {self.boxes} boxes, {self.rejected} rejected "
                f"(dataset {self.fingerprint}: {parent} +{self.added} added, ~{self.changed} "
                f"changed, -{self.removed} removed)")


def ingest(ctx: StageContext, inputs: IngestInputs, options: ExportsConfig) -> Ingested:
    """The run's version builds on the current one; a backfill merges its late exports into
    it, `run.take_exports: all` rebuilds from every export (still diffed against it)."""
    from odapi_operators.core.data.ingest import ingest as ingest_exports

    run = ctx.pipeline.run if ctx.pipeline else None
    summary = ingest_exports(list(inputs.exports), ctx.folder, images_root=options.images_root,
                             fmt=options.format, options=options.parser_options(),
                             label_map=inputs.label_map or _production_label_map(ctx),
                             unknown_classes=options.unknown_classes,
                             max_rejected_share=options.max_rejected_share,
                             class_aliases=options.class_aliases,
                             datasets_dir=ctx.pipeline.datasets if ctx.pipeline else None,
                             run_id=ctx.run_id, marker=options.marker, mode=options.mode,
                             modes=options.modes, deleted_file=options.deleted_file,
                             rebuild=bool(run and run.take_exports == "all"
                                          and not run.is_backfill))
    for path in summary.get("ignored_files", []):
        ctx.log(f"not an annotation or image file, ignored: {path}")
    for path, note in summary.get("skipped_files", {}).items():
        ctx.log(f"skipped {path}: {note}")
    for warning in summary.get("warnings", []):
        ctx.log(f"warning: {warning}")
    for export in summary.get("exports", []):
        ctx.log(f"export {export['path']}: {export['mode']}, landed {export['landed_at']}")
    if summary.get("superseded"):
        ctx.log(f"{len(summary['superseded'])} images keep labels from exports that landed "
                f"later than the ones consumed now (e.g. {summary['superseded'][0]})")
    groups = summary["group_boxes"]
    if groups["kept"] or groups["skipped"]:
        ctx.log(f"group boxes (COCO iscrowd, Open Images IsGroupOf): {groups['kept']} kept, "
                f"{groups['skipped']} skipped ({setting('exports.group_boxes', groups['policy'])})")
    return Ingested(**summary)


INGEST = StageSpec(name="ingest", help="parse annotation exports into a canonical manifest",
                   inputs=IngestInputs, result=Ingested, run=ingest, section="exports",
                   folder=Stage.INGEST)


# --- fetch ----------------------------------------------------------------------------------

class FetchInputs(Inputs):
    manifest: str | None = Field(default=None, description="manifest written by ingest")
    index: str | None = Field(default=None, description="or an Open Images image index CSV "
                              "(ImageID, OriginalURL[, OriginalMD5, Rotation]): images are "
                              "stored in the output folder as <ImageID>.<ext>")


class Fetched(Result):
    log_format = ("{ok} images stored, {failed} failed, {skipped} already there, "
                  "{reused} reused from earlier runs")

    manifest: str | None = None
    failures: str
    ok: int
    failed: int
    skipped: int
    reused: int = 0


def fetch(ctx: StageContext, inputs: FetchInputs, options: ImagesConfig) -> Fetched:
    from odapi_operators.core.data.fetch import fetch_images, fetch_records

    if bool(inputs.manifest) == bool(inputs.index):
        raise ValueError(f"give {setting('manifest')} (a manifest) or {setting('index')} "
                         "(an image index), one of them")
    common: dict[str, Any] = dict(threads=options.threads, policy=options.policy(),
                                  max_failed_share=options.max_failed_share,
                                  cache_dir=options.cache,
                                  **(ctx.progress or {"log": ctx.log}))
    if inputs.manifest:
        return Fetched(**fetch_images(inputs.manifest, ctx.folder, **common))
    from odapi_operators.core.data.image_index import read_image_index
    from odapi_operators.core.rejections import RejectionLog

    logs: list[RejectionLog] = []

    def records():
        logs.append(RejectionLog())
        return read_image_index(inputs.index, logs[-1])

    try:
        summary = fetch_records(records, ctx.folder, files_dir=ctx.folder, **common)
    finally:
        if logs:
            logs[-1].write(ctx.folder / "index-rejections.jsonl")
    return Fetched(**summary, index_rejected=len(logs[-1]))


FETCH = StageSpec(name="fetch", help="download/copy images into a resumable image store",
                  inputs=FetchInputs, result=Fetched, run=fetch, section="images",
                  folder=Stage.IMAGES)


# --- verify -------------------------------------------------------------------------------

class ManifestInput(Inputs):
    manifest: str = Field(description="manifest of the previous stage")


class Verified(Result):
    manifest: str
    quarantine: str
    ok: int
    failed: int
    boxes_quarantined: int = 0
    skipped: int = 0
    reused: int = 0

    def log_line(self) -> str:
        note = f"; see {self.quarantine}" if self.failed else ""
        reused = f", {self.reused} reused from earlier runs" if self.reused else ""
        return (f"{self.ok} images verified, {self.failed} quarantined "
                f"({self.boxes_quarantined} boxes){reused}{note}")


def verify(ctx: StageContext, inputs: ManifestInput, options: ImagesConfig) -> Verified:
    from odapi_operators.core.data.verify import verify_images

    return Verified(**verify_images(inputs.manifest, ctx.folder, max_side=options.max_side,
                                    workers=options.workers,
                                    max_quarantined_share=options.max_quarantined_share,
                                    cache_dir=options.cache,
                                    **(ctx.progress or {"log": ctx.log})))


VERIFY = StageSpec(name="verify", help="fully decode every image; normalize; quarantine bad "
                   "ones", inputs=ManifestInput, result=Verified, run=verify, section="images",
                   folder=Stage.VERIFY,
                   process="child")  # its decoder pool needs a non-daemonic parent (Celery)


# --- label_map ------------------------------------------------------------------------------

class LabelMapInputs(Inputs):
    manifest: str = Field(description="verified manifest")
    previous: str | None = Field(default=None, description="existing label_map.pbtxt whose "
                                 "ids are kept (default: the production model's)")


class LabelMapped(Result):
    log_format = "{num_classes} classes, new: {new_classes}"

    label_map: str
    num_classes: int
    new_classes: list[str] = []


def label_map(ctx: StageContext, inputs: LabelMapInputs, options: None) -> LabelMapped:
    """Ids extend the production model's label map; they are never renumbered."""
    from odapi_operators.core.data.label_map import build_label_map

    summary = build_label_map(inputs.manifest, ctx.folder,
                              previous=inputs.previous or _production_label_map(ctx))
    return LabelMapped(**summary, num_classes=len(summary["classes"]))


LABEL_MAP = StageSpec(name="label_map", help="write label_map.pbtxt (append-only ids)",
                      inputs=LabelMapInputs, result=LabelMapped, run=label_map,
                      folder=Stage.LABEL_MAP)


# --- records --------------------------------------------------------------------------------

class RecordsInputs(Inputs):
    manifest: str = Field(description="verified manifest")
    label_map: str = Field(description="label_map.pbtxt")


class Records(Result):
    data: str
    splits: dict[str, dict[str, Any]]  # per split: images, boxes, per_class, pattern, ...
    cached: bool = False

    def log_line(self) -> str:
        images = {split: stats.get("images") for split, stats in self.splits.items()}
        return f"records in {self.data}: {images}" + (" (cached)" if self.cached else "")


def _records_result(folder: Any, summary: dict) -> Records:
    return Records(**{**summary, "data": str(folder)})


def records(ctx: StageContext, inputs: RecordsInputs, options: RecordsConfig) -> Records:
    from odapi_operators.core.data.shard import write_shards

    summary = write_shards(inputs.manifest, inputs.label_map, ctx.folder, options.split,
                           options.shards, target_shard_bytes=options.target_shard_mb << 20,
                           workers=options.workers, cache_dir=options.cache)
    return _records_result(ctx.folder, summary)


RECORDS = StageSpec(name="shard", help="write sharded TFRecords per split",
                    inputs=RecordsInputs, result=Records, run=records, section="records",
                    folder=Stage.RECORDS,
                    process="child")  # its writer pool needs a non-daemonic parent (Celery)


# --- records as mapped tasks: plan, one shard each, finish ------------------------------------

class ShardTask(Result):
    split: str
    index: int
    count: int
    counts: dict[str, int]
    fingerprint: str


class ShardPlan(Result):
    items = "shards"
    log_format = "shards planned: {shards}"

    shards: list[ShardTask]


def plan(ctx: StageContext, inputs: RecordsInputs, options: RecordsConfig) -> ShardPlan:
    """The shard layout, one task per shard: each carries the whole layout, so the plan's
    `shards` can be mapped over (`WriteShardOperator.partial(...).expand(shard=...)`)."""
    from odapi_operators.core.data.shard import plan_shards

    layout = plan_shards(inputs.manifest, inputs.label_map, options.split, options.shards,
                         target_shard_bytes=options.target_shard_mb << 20)
    return ShardPlan(shards=[ShardTask(**shard, counts=layout["counts"],
                                       fingerprint=layout["fingerprint"])
                             for shard in layout["shards"]])


class ShardInputs(RecordsInputs):
    shard: ShardTask = Field(description="one task of the plan")


class ShardWritten(Result):
    name: str | None = None


def write_one(ctx: StageContext, inputs: ShardInputs, options: RecordsConfig) -> ShardWritten:
    from odapi_operators.core.data.shard import write_shard

    shard = inputs.shard
    return ShardWritten(**write_shard(inputs.manifest, inputs.label_map, ctx.folder,
                                      options.split, shard.split, shard.index, shard.count,
                                      counts=shard.counts))


class FinishInputs(RecordsInputs):
    plan: list[ShardTask] = Field(description="the plan's shards")


def finish(ctx: StageContext, inputs: FinishInputs, options: RecordsConfig) -> Records:
    from odapi_operators.core.data.shard import finish_shards

    first = inputs.plan[0]
    return _records_result(ctx.folder, finish_shards(
        inputs.manifest, inputs.label_map, ctx.folder, options.split, first.counts,
        fingerprint=first.fingerprint))


PLAN_SHARDS = StageSpec(name="plan_shards", help="plan the shards, one mapped task each",
                        inputs=RecordsInputs, result=ShardPlan, run=plan, section="records",
                        folder=Stage.RECORDS)
WRITE_SHARD = StageSpec(name="write_shard", help="write one planned shard",
                        inputs=ShardInputs, result=ShardWritten, run=write_one,
                        section="records", folder=Stage.RECORDS)
FINISH_SHARDS = StageSpec(name="finish_shards", help="per-split stats and the records "
                          "summary after every planned shard", inputs=FinishInputs,
                          result=Records, run=finish, section="records", folder=Stage.RECORDS)


# --- images as partitions: plan, prepare each, join; records per partition, finish ---------

class PartitionTask(Result):
    index: int
    count: int
    name: str
    folder: str
    images: int


class PartitionPlan(Result):
    items = "partitions"

    partitions: list[PartitionTask]

    def log_line(self) -> str:
        sizes = [p.images for p in self.partitions]
        return (f"{sum(sizes)} images in {len(sizes)} partitions of {min(sizes)}-{max(sizes)} "
                "images")


def plan_parts(ctx: StageContext, inputs: ManifestInput, options: ImagesConfig) -> PartitionPlan:
    """One manifest per partition, one mapped task each (`partition=plan.output`)."""
    from odapi_operators.core.data.partitions import plan_partitions
    from odapi_operators.core.data.shard import MAX_SOURCE_ID

    plan = plan_partitions(inputs.manifest, ctx.folder, partitions=options.partitions,
                           partition_images=options.partition_images, max_images=MAX_SOURCE_ID)
    return PartitionPlan(partitions=plan["partitions"])


class PartitionInput(Inputs):
    partition: PartitionTask = Field(description="one partition of the plan")


class PartitionPrepared(Result):
    log_format = ("{ok} images verified, {fetch_failed} failed to fetch, {quarantined} "
                  "quarantined; {reused} fetched and {verify_reused} verified by earlier runs")

    manifest: str
    ok: int


def prepare_part(ctx: StageContext, inputs: PartitionInput,
                 options: ImagesConfig) -> PartitionPrepared:
    from odapi_operators.core.data.partitions import prepare_partition

    return PartitionPrepared(**prepare_partition(
        inputs.partition.folder, max_side=options.max_side, threads=options.threads,
        workers=options.workers, policy=options.policy(), cache_dir=options.cache,
        **(ctx.progress or {"log": ctx.log})))


class PartitionsInput(Inputs):
    partitions: list[PartitionTask] = Field(description="the plan's partitions")


def join_parts(ctx: StageContext, inputs: PartitionsInput, options: ImagesConfig) -> Verified:
    """The run's verified manifest, and its budgets checked over all partitions."""
    from odapi_operators.core.data.partitions import join_partitions

    return Verified(**join_partitions([p.model_dump() for p in inputs.partitions], ctx.folder,
                                      max_failed_share=options.max_failed_share,
                                      max_quarantined_share=options.max_quarantined_share))


class PartitionRecordsInputs(PartitionInput):
    label_map: str = Field(description="label_map.pbtxt")


class PartitionShards(Result):
    log_format = "shards written: {shards}"

    shards: list[str]


def shard_part(ctx: StageContext, inputs: PartitionRecordsInputs,
               options: RecordsConfig) -> PartitionShards:
    from odapi_operators.core.data.shard import write_partition

    part = inputs.partition
    stats = write_partition(Path(part.folder) / "verify" / "manifest.jsonl", inputs.label_map,
                            ctx.folder, options.split, part.index, part.count)
    return PartitionShards(shards=[s["shard"] for s in stats])


class FinishPartitionsInputs(RecordsInputs):
    partitions: list[PartitionTask] = Field(description="the plan's partitions")


def finish_parts(ctx: StageContext, inputs: FinishPartitionsInputs,
                 options: RecordsConfig) -> Records:
    from odapi_operators.core.data.shard import finish_partitions

    manifests = [Path(p.folder) / "verify" / "manifest.jsonl" for p in inputs.partitions]
    return _records_result(ctx.folder, finish_partitions(
        inputs.manifest, manifests, inputs.label_map, ctx.folder, options.split))


PLAN_PARTITIONS = StageSpec(name="plan_partitions", help="cut the manifest into partitions by "
                            "image key, one mapped task each", inputs=ManifestInput,
                            result=PartitionPlan, run=plan_parts, section="images",
                            folder=Stage.PARTITIONS)
# folder None: it writes only its partition's folder, and sweeps only that (data/partitions.py)
PREPARE_PARTITION = StageSpec(name="prepare_partition", help="fetch and verify one partition",
                              inputs=PartitionInput, result=PartitionPrepared, run=prepare_part,
                              section="images",
                              process="child")  # its decoder pool needs a non-daemonic parent
JOIN_PARTITIONS = StageSpec(name="join_partitions", help="the run's verified manifest from its "
                            "prepared partitions; the failure budgets", inputs=PartitionsInput,
                            result=Verified, run=join_parts, section="images",
                            folder=Stage.VERIFY)
SHARD_PARTITION = StageSpec(name="shard_partition", help="write one partition's shard of each "
                            "split", inputs=PartitionRecordsInputs, result=PartitionShards,
                            run=shard_part, section="records", folder=Stage.RECORDS)
FINISH_PARTITIONS = StageSpec(name="finish_partitions", help="per-split stats and the records "
                              "summary after every partition's shards",
                              inputs=FinishPartitionsInputs, result=Records, run=finish_parts,
                              section="records", folder=Stage.RECORDS)

STAGES = (SELECT_EXPORTS, INGEST, FETCH, VERIFY, LABEL_MAP, RECORDS, PLAN_SHARDS, WRITE_SHARD,
          FINISH_SHARDS, PLAN_PARTITIONS, PREPARE_PARTITION, JOIN_PARTITIONS, SHARD_PARTITION,
          FINISH_PARTITIONS)
