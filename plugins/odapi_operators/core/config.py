"""The one pipeline config loader: YAML in, validated typed config out, errors name the key.

Relative paths resolve against `home`: the YAML's `home` key, else `$ODAPI_HOME`, else the
project root (two levels above a config in `include/configs/`, the config's folder
otherwise). A run freezes its resolved config into `<runs>/<run_id>/config/pipeline.json`, and
every later stage reads that file, so a run never sees a config edited halfway through it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from odapi_operators.core import storage
from odapi_operators.core.evaluation.gate import GatePolicy
from odapi_operators.core.failures import Failure
from odapi_operators.core.layout import PIPELINE
from odapi_operators.core.serving.models_config import ModelName, ServingOptions


class ConfigError(ValueError):
    """The config is invalid; the message names the file and every bad key."""
    failure = Failure.CONFIG


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


FormatName = Literal["auto", "voc", "cvat", "coco", "labelstudio", "prodigy", "openimages", "csv",
                     "yolo", "tfrecord"]


ExportMode = Literal["incremental", "snapshot"]


def only(*stages: str) -> dict:
    """Field metadata: this option belongs to these stages of a shared section (their
    commands offer it; the others do not). `watch` is the export sensor, `approve` the
    approval task; `push` reads `promote.canary` from the run's config."""
    return {"stages": list(stages)}


class ExportsConfig(_Strict):
    path: str = Field(description="export folder, or a folder of export folders, to watch; "
                                  "or labelstudio://<connection id>/projects/<id>",
                      json_schema_extra=only("watch", "select_exports"))
    labelstudio_pulls: str = Field(
        default="var/labelstudio-pulls", json_schema_extra=only("watch"),
        description="with a labelstudio:// path: the sensor pulls the project's export here "
                    "(one export folder a pull) when its annotations changed")
    format: FormatName = Field(default="auto", description="annotation format of the exports")
    marker: str | None = Field(default="_SUCCESS",
                               json_schema_extra=only("watch", "select_exports", "ingest"),
                               description="an export counts once this file exists; its "
                                           "time is when the export landed")
    inactivity_seconds: int = Field(default=0, ge=0, json_schema_extra=only("watch"),
                                    description="without a marker: unchanged this long")
    watch_seconds: float = Field(default=5, gt=0, json_schema_extra=only("watch"),
                                 description="the export watcher (event-driven runs) looks "
                                             "this often: a new export starts a run within "
                                             "about twice this")
    images_root: str | None = Field(default=None, description="resolve image names here "
                                                               "(never outside it)")
    unknown_classes: Literal["add", "skip", "reject"] = Field(
        default="add", description="classes not in the label map: add them, skip their boxes, "
                                   "or reject the image")
    classes: list[str] | None = Field(default=None, description="train only these classes "
                                                                "(names; Open Images MIDs too)")
    group_boxes: Literal["skip", "keep"] = Field(
        default="skip", description="boxes drawn around a group of objects (COCO iscrowd, Open "
                                    "Images IsGroupOf): skip them, reported per box (an image "
                                    "left with only group boxes is dropped), or keep them as "
                                    "ordinary boxes, counted in the ingest summary",
        json_schema_extra=only("ingest"))
    class_aliases: dict[str, str] | None = Field(
        default=None, description="class name -> the class it stands for, e.g. butterfly -> "
                                  "Butterfly: one class however the tools spelled it (applied "
                                  "before the label map and unknown_classes)",
        json_schema_extra=only("ingest"))
    csv_columns: dict[str, str] | None = Field(
        default=None, description="CSV layout, our name -> CSV header: image, label, xmin, "
                                  "ymin, xmax, ymax[, width, height]")
    max_rejected_share: float = Field(
        default=0.2, ge=0, le=1, json_schema_extra=only("ingest"),
        description="fail the ingest when rejections exceed this share of what it read "
                    "(images kept + rejections); annotators' choices (not accepted, cancelled, "
                    "superseded, unlabeled), identical duplicates, skipped group boxes and the "
                    "classes "
                    "/ unknown_classes filters do not count")
    mode: ExportMode = Field(
        default="incremental", json_schema_extra=only("ingest"),
        description="what an export says about the dataset. incremental: it adds the images it "
                    "holds and relabels those it holds again; it removes only those its deleted "
                    "file lists (exports of one labelling batch each: a folder per batch, a "
                    "Prodigy dataset, CVAT task or Label Studio view per batch). snapshot: it is "
                    "the whole labelling project, and an image absent from it leaves the "
                    "dataset (what Label Studio and CVAT project exports, `prodigy db-out`, a "
                    "labelImg folder that grows and a Roboflow dataset version hold; "
                    "labelstudio:// pulls too)")
    modes: dict[str, ExportMode] = Field(
        default={}, json_schema_extra=only("ingest"),
        description="per export source: export path glob -> mode, overriding mode; the first "
                    "glob that matches the export's path wins (fnmatch: * also crosses /), "
                    "e.g. {'*/labelstudio-*': snapshot}")
    deleted_file: str = Field(
        default="deleted.txt", json_schema_extra=only("ingest"),
        description="file in an export (path relative to it) listing images to remove from "
                    "the dataset, one a line: the image's key or its name as the export names "
                    "images (file name, path or URL); a line starting with # is a comment. "
                    "Read, never parsed as annotations")
    ledger: str = Field(default="var/exports-ledger.jsonl",
                        json_schema_extra=only("select_exports"),
                        description="which run consumed which export")

    def parser_options(self) -> dict:
        return {k: v for k, v in (("classes", self.classes), ("csv_columns", self.csv_columns),
                                  ("group_boxes", self.group_boxes)) if v is not None}


# images options a partition's task (data/partitions.py) reads too, as fetch or verify does
_FETCHING, _DECODING = only("fetch", "prepare_partition"), only("verify", "prepare_partition")


class ImagesConfig(_Strict):
    """Download and verify settings (see core/data/download.py, core/data/verify.py)."""

    max_side: int | None = Field(default=None, gt=0, json_schema_extra=_DECODING,
                                 description="shrink larger images to this longest side")
    max_failed_share: float = Field(default=0.05, ge=0, le=1,
                                    json_schema_extra=only("fetch", "join_partitions"),
                                    description="fail above this share of failed downloads")
    max_quarantined_share: float = Field(default=0.05, ge=0, le=1,
                                         json_schema_extra=only("verify", "join_partitions"),
                                         description="fail above this share of quarantined "
                                                     "images (undecodable, refused format or "
                                                     "wrong size)")
    threads: int | None = Field(default=None, gt=0, json_schema_extra=_FETCHING,
                                description="requests in flight (default: 64 per core)")
    workers: int | None = Field(default=None, gt=0, json_schema_extra=_DECODING,
                                description="decoding processes (default: one per core)")
    retries: int = Field(default=3, ge=0, json_schema_extra=_FETCHING)
    connect_timeout: float = Field(default=10.0, gt=0, json_schema_extra=_FETCHING)
    read_timeout: float = Field(default=20.0, gt=0, json_schema_extra=_FETCHING)
    deadline: float = Field(default=90.0, gt=0, json_schema_extra=_FETCHING,
                            description="seconds for one whole response (slow-loris guard)")
    max_mb: int = Field(default=50, gt=0, json_schema_extra=_FETCHING,
                        description="largest image body in MiB")
    cache: str | None = Field(default="var/image-cache",
                              json_schema_extra=only("fetch", "verify", "prepare_partition"),
                              description="images fetched and verified by earlier runs, reused "
                              "by source and content (null: every run fetches and decodes all "
                              "of its images)")
    partitions: int | None = Field(
        default=None, ge=1, le=1024, json_schema_extra=only("plan_partitions"),
        description="cut the dataset into this many partitions by image key: each is fetched, "
                    "verified and written to records by Airflow mapped tasks of its own, so a "
                    "run spreads over every worker and a lost worker costs one partition "
                    "(at most [core] max_map_length, 1024)")
    partition_images: int | None = Field(
        default=None, gt=0, json_schema_extra=only("plan_partitions"),
        description="with partitions unset: one partition per this many images (both unset: "
                    "one task each for fetch, verify and records, for small datasets)")

    @property
    def partitioned(self) -> bool:
        """Whether runs prepare images as partitions (mapped tasks) or in one task each."""
        return bool(self.partitions or self.partition_images)

    def policy(self):
        from odapi_operators.core.data.download import DownloadPolicy

        return DownloadPolicy(connect_timeout=self.connect_timeout,
                              read_timeout=self.read_timeout, deadline=self.deadline,
                              retries=self.retries, max_bytes=self.max_mb << 20)


class RecordsConfig(_Strict):
    split: dict[str, float] = Field(default={"train": 0.8, "val": 0.2},
                                    description="split ratios, e.g. train=0.8,val=0.2")
    # images as partitions (images.partitions) write one shard per split and partition instead
    shards: dict[str, int] | None = Field(default=None, description="shards per split, e.g. "
                                          "train=32,val=4 (default: by target_shard_mb)",
                                          json_schema_extra=only("shard", "plan_shards"))
    target_shard_mb: int = Field(default=128, gt=0, json_schema_extra=only("shard", "plan_shards"))
    cache: str | None = Field(default="var/records-cache", json_schema_extra=only("shard"),
                              description="reuse shards of the same content written here")
    workers: int | None = Field(default=None, gt=0, json_schema_extra=only("shard"),
                                description="writer processes (default: one per core)")

    @field_validator("split")
    @classmethod
    def _has_train_and_val(cls, value: dict[str, float]) -> dict[str, float]:
        if not {"train", "val"} <= set(value) or any(v < 0 for v in value.values()):
            raise ValueError("needs non-negative 'train' and 'val' ratios")
        return value


class KubernetesPlacement(_Strict):
    """A pod per training run, from the project image, requesting `gpus` NVIDIA GPUs."""

    image: str = "odapi:latest"
    namespace: str = "default"
    gpus: int = Field(default=1, ge=0)
    service_account: str | None = None
    volume_claim: str | None = None  # PVC mounted at mount_path (runs and records live there)
    mount_path: str = "/opt/odapi/var"
    node_selector: dict[str, str] = {}
    startup_timeout_seconds: int = Field(default=600, gt=0)
    workers: int = Field(default=1, ge=1, description="pods training together "
                         "(MultiWorkerMirroredStrategy over an Indexed Job; each pod gets "
                         "`gpus`); 1: a single pod")


class TrainPlacement(_Strict):
    """Where the train task runs: a child process of the worker that picks it up (`local`),
    a Celery worker listening on `queue` (`celery`), or a Kubernetes pod (`kubernetes`).
    `pool` caps concurrent trainings (create it: `airflow pools set gpu 1 "GPU"`)."""

    where: Literal["local", "celery", "kubernetes"] = "local"
    pool: str | None = "gpu"
    queue: str = "gpu"
    kubernetes: KubernetesPlacement = KubernetesPlacement()


class TrainConfig(_Strict):
    model_config_path: str = Field(alias="model_config",
                                   description="TF-Vision model config YAML "
                                               "(include/configs/models)")
    steps: int = Field(gt=0, description="train until this global step")
    batch_size: int = Field(default=8, gt=0, description="global batch size")
    init_checkpoint: str | None = Field(
        default=None, description="start from this checkpoint (prefix or folder, local or "
                                  "gs://): one of ours, or a TF-Vision backbone checkpoint; "
                                  "an explicit start point wins over train.warm_start")
    warm_start: bool = Field(default=True, description="continuous training: once a model "
                             "is in production, start from its weights on the whole dataset "
                             "version (false: from scratch)")
    warm_start_steps: int | None = Field(
        default=None, gt=0, description="step budget of a warm-started training (none: "
                                        "train.steps); a scratch training uses train.steps")
    warm_start_lr_factor: float = Field(
        default=1.0, gt=0, le=1, description="a start from a trained detector of ours "
        "(production, or one of ours as train.init_checkpoint) fine-tunes: the model config's "
        "peak learning rate times this, no warm-up, decaying over the run's steps (1 suits "
        "Adam, whose steps are ~lr whatever the gradients; an SGD recipe may want ~0.25)")
    placement: TrainPlacement = TrainPlacement()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class EvaluateConfig(_Strict):
    min_images: int = Field(default=1, ge=1, description="fewer val images: evaluation fails")
    missing_classes: Literal["fail", "warn"] = Field(
        default="fail", description="a class of the label map without val boxes")
    export_ahead: bool = Field(
        default=True, json_schema_extra={"stages": ["evaluate"]},
        description="in a pipeline run, export the candidate (export section's settings) in "
                    "its evaluation's process, before the gate: one TensorFlow start-up and "
                    "one trace of the model for both; the export task then only adds the "
                    "run's metrics and decision. Wasted when the gate refuses")


class ExportConfig(_Strict):
    input_type: Literal["image_tensor", "image_bytes", "tf_example"] = Field(
        default="image_tensor", description="what the SavedModel's serving_default takes")
    warmup_images: int = Field(default=8, ge=1, le=1000, description="validation images "
                               "replayed as warmup requests and through the export check")


class ReportConfig(_Strict):
    grid_images: int = Field(default=12, ge=0, description="validation images to draw")
    score_threshold: float = Field(default=0.3, ge=0, le=1,
                                   description="lowest score of a drawn prediction")


class PreannotateConfig(_Strict):
    """Pre-annotation and active learning (DAG odapi_preannotate, `odapi preannotate`)."""

    pool: str = Field(default="var/unlabeled", description="unlabeled images: a folder, a "
                      "gs:// prefix, or a text file of URLs/paths (one a line)")
    out_dir: str = Field(default="var/preannotations", description="batches go to "
                         "<out_dir>/<run id>/; the sent ledger and download cache live here")
    format: Literal["prodigy", "labelstudio"] = Field(default="prodigy",
                                                      description="task format to write")
    top_k: int | None = Field(default=100, ge=1, description="images to send (none: every "
                              "one that passes the guards)")
    score_threshold: float = Field(default=0.3, ge=0, le=1,
                                   description="lowest score of a proposed box")
    max_boxes: int = Field(default=20, ge=1, description="most proposed boxes per image")
    batch_size: int = Field(default=8, ge=1, description="images per model call")
    band: tuple[float, float] = Field(default=(0.2, 0.6), description="borderline score "
                                      "band for uncertainty, e.g. [0.2, 0.6]")
    max_hamming: int = Field(default=6, ge=0, description="dHash bits within which two "
                             "images are near-duplicates")
    inline_images: bool = Field(default=True, description="Prodigy: inline local images as "
                                "data URIs instead of naming them by path")
    candidate: str | None = Field(default=None, description="a second model (e.g. a training "
                                  "model dir): images where it disagrees rank higher")
    labeled: list[str] | None = Field(default=None, description="manifests or exports whose "
                                      "images are labeled already (default: exports.path)")


class PromoteConfig(_Strict):
    """How a candidate the gate passed reaches `stable`: after a person's approval (an
    Airflow Human-in-the-loop task, the `approve` task), and through the `canary` label first.
    Both off: the gate's verdict moves `stable` at once."""

    approval: bool = Field(default=False, json_schema_extra=only("approve"),
                           description="wait for a person to promote to stable, serve as "
                                       "canary only, or reject (Airflow's Required Actions)")
    approval_timeout_hours: float = Field(default=24, gt=0, json_schema_extra=only("approve"),
                                          description="no answer within this: rejected")
    canary: bool = Field(default=False, json_schema_extra=only("push"),
                         description="push as `canary` first; `stable` moves only after the "
                                     "canary check against stable passes")
    canary_images: int = Field(default=16, ge=0, description="val images replayed against "
                               "canary and stable, beside the version's warmup requests")
    canary_p95_ms: float = Field(default=1000, gt=0, description="the canary fails when the "
                                 "95th percentile of its answer times exceeds this (ms)")
    canary_min_agreement: float = Field(
        default=0.6, ge=0, le=1, description="the canary fails when its detections agree "
        "less than this with stable's, on average over the requests (per request: boxes "
        "matched by IoU with the same class, over the union of both models' boxes)")
    canary_score_threshold: float = Field(default=0.3, ge=0, le=1, description="detections "
                                          "below this score are left out of the agreement")
    canary_match_iou: float = Field(default=0.5, gt=0, le=1, description="IoU at which a "
                                    "canary box and a stable box count as the same object")


class RunConfig(_Strict):
    """What shaped one run besides the YAML: frozen with it, so `pipeline.json` replays it.

    Filled by `resolve_config` from the Airflow run (id, type, data interval, who triggered
    it) and the DAG params that are per-run switches rather than options of a section.
    """

    id: str | None = None
    type: str | None = None  # manual, scheduled, backfill, asset_triggered
    data_interval_start: str | None = None  # ISO; a backfill consumes what landed in it
    data_interval_end: str | None = None
    triggered_by: str | None = None
    take_exports: Literal["new", "all"] = Field(
        default="new", description="new: exports no run consumed yet; all: every complete "
                                   "export")
    dry_run: bool = Field(default=False, description="everything but the push")
    force_promote: bool = Field(default=False, description="promote whatever the gate says "
                                                           "(needs a reason)")
    reason: str | None = Field(default=None, description="why: a forced promotion or a "
                                                         "rollback (recorded)")
    rollback_to: int | None = Field(default=None, ge=1, description="rollback target version "
                                    "(default: the previous stable)")
    params: dict[str, Any] = Field(default={}, description="the DAG params as given")

    @property
    def is_backfill(self) -> bool:
        return (self.type or "").lower().endswith("backfill")


class ServingConfig(ServingOptions):
    base: str = Field(description="TF Serving base folder or gs:// prefix")
    model_name: ModelName = Field(description="the model's name in TF Serving and its "
                                  "folder under `base`: a plain name")


class PipelineConfig(_Strict):
    home: str
    runs: str = "var/runs"
    datasets: str = "var/datasets"
    exports: ExportsConfig
    images: ImagesConfig = ImagesConfig()
    records: RecordsConfig = RecordsConfig()
    train: TrainConfig
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GatePolicy = GatePolicy()
    report: ReportConfig = ReportConfig()
    export: ExportConfig = ExportConfig()
    serving: ServingConfig
    promote: PromoteConfig = PromoteConfig()
    preannotate: PreannotateConfig = PreannotateConfig()
    notify: dict[str, Any] = {}  # notifiers.build_notifiers; empty: no notifications
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        """Combinations no single field can refuse."""
        problems = []
        if self.run.force_promote and not (self.run.reason or "").strip():
            problems.append("run.force_promote needs run.reason (the force_reason param): it "
                            "is recorded in decision.json")
        if self.train.warm_start_steps and not self.train.warm_start:
            problems.append("train.warm_start_steps is the budget of a warm start: it needs "
                            "train.warm_start")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True), indent=2)


PATH_KEYS = ("runs", "datasets", "exports.ledger", "images.cache", "records.cache",
             "serving.models_config", "serving.registry", "exports.path", "exports.images_root",
             "train.model_config", "train.init_checkpoint", "serving.base", "preannotate.pool",
             "preannotate.out_dir", "exports.labelstudio_pulls")


def default_home(config_path: Path) -> Path:
    if os.environ.get("ODAPI_HOME"):
        return Path(os.environ["ODAPI_HOME"])
    parent = config_path.resolve().parent
    if parent.name == "configs" and parent.parent.name == "include":
        return parent.parent.parent
    return parent


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def _get_dotted(data: dict, dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _field_default(dotted: str) -> Any:
    """The default of a dotted config key, from the models (the one place defaults live)."""
    model: Any = PipelineConfig
    info = None
    for key in dotted.split("."):
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        info = fields.get(key)
        if info is None:
            return None
        model = info.annotation
    return None if info is None or info.is_required() else info.default


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid pipeline config"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if not key:  # a rule over several keys (PipelineConfig._consistent)
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
            continue
        lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def validate_config(data: dict, source: str) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


def load_pipeline_config(path: str | Path,
                         overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load, override (dotted keys, e.g. {'train.steps': 20}), resolve paths and validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read pipeline config: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    home = Path(data.get("home") or default_home(path))
    if not home.is_absolute():
        home = (path.resolve().parent / home).resolve()
    data["home"] = str(home)
    for key in PATH_KEYS:  # a path left at its default resolves against home too
        default = _field_default(key)
        if isinstance(default, str) and _get_dotted(data, key) is None:
            parent = _get_dotted(data, key.rpartition(".")[0]) if "." in key else data
            if parent is None or isinstance(parent, dict):
                _set_dotted(data, key, default)
    for key in PATH_KEYS:
        value = _get_dotted(data, key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            _set_dotted(data, key, str(home / value))
    return validate_config(data, str(path))


def read_frozen_config(path: str | Path) -> PipelineConfig:
    """Read the resolved config a run froze with `freeze_config`."""
    return validate_config(json.loads(storage.read_text(path)), str(path))


def freeze_config(config: PipelineConfig, out_dir: str | Path) -> str:
    target = Path(out_dir) / PIPELINE
    storage.write_text(target, config.to_json())
    return str(target)
