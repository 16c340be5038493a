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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from odapi_operators.core.failures import Failure
from odapi_operators.core import storage
from odapi_operators.core.evaluation.gate import GatePolicy
from odapi_operators.core.serving.models_config import ServingOptions


class ConfigError(ValueError):
    """The config is invalid; the message names the file and every bad key."""
    failure = Failure.CONFIG


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


FormatName = Literal["auto", "voc", "cvat", "coco", "labelstudio", "prodigy", "openimages", "csv"]


class ExportsConfig(_Strict):
    path: str = Field(description="export folder, or a folder of export folders, to watch")
    format: FormatName = "auto"
    marker: str | None = "_SUCCESS"
    inactivity_seconds: int = Field(default=0, ge=0)  # without a marker: unchanged this long
    images_root: str | None = None
    unknown_classes: Literal["add", "skip", "reject"] = "add"
    classes: list[str] | None = None  # train only these classes (names; Open Images MIDs too)
    csv_columns: dict[str, str] | None = None  # our name -> CSV header, for other CSV layouts
    ledger: str = "var/exports-ledger.jsonl"

    def parser_options(self) -> dict:
        return {k: v for k, v in (("classes", self.classes), ("csv_columns", self.csv_columns))
                if v is not None}


class ImagesConfig(_Strict):
    """Download and verify settings (see core/data/download.py, core/data/verify.py)."""

    max_side: int | None = Field(default=None, gt=0)  # resize larger images (draft decoding)
    max_failed_share: float = Field(default=0.05, ge=0, le=1)  # download failure budget
    max_quarantined_share: float = Field(default=1.0, ge=0, le=1)  # verify failure budget
    threads: int | None = Field(default=None, gt=0)  # None: 64 per core
    workers: int | None = Field(default=None, gt=0)  # decode processes; None: one per core
    retries: int = Field(default=3, ge=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=20.0, gt=0)
    deadline: float = Field(default=90.0, gt=0)  # per image, whole body (slow-loris guard)
    max_mb: int = Field(default=50, gt=0)

    def policy(self):
        from odapi_operators.core.data.download import DownloadPolicy

        return DownloadPolicy(connect_timeout=self.connect_timeout,
                              read_timeout=self.read_timeout, deadline=self.deadline,
                              retries=self.retries, max_bytes=self.max_mb << 20)


class RecordsConfig(_Strict):
    split: dict[str, float] = {"train": 0.8, "val": 0.2}
    shards: dict[str, int] | None = None  # None: as many as target_shard_mb gives
    target_shard_mb: int = Field(default=128, gt=0)
    cache: str | None = "var/records-cache"  # same dataset version: shards reused

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


class TrainPlacement(_Strict):
    """Where the train task runs: a child process of the worker that picks it up (`local`),
    a Celery worker listening on `queue` (`celery`), or a Kubernetes pod (`kubernetes`).
    `pool` caps concurrent trainings (create it: `airflow pools set gpu 1 "GPU"`)."""

    where: Literal["local", "celery", "kubernetes"] = "local"
    pool: str | None = "gpu"
    queue: str = "gpu"
    kubernetes: KubernetesPlacement = KubernetesPlacement()


class TrainConfig(_Strict):
    model_config_path: str = Field(alias="model_config")
    steps: int = Field(gt=0)
    batch_size: int = Field(default=8, gt=0)
    init_checkpoint: str | None = None  # start from this checkpoint (local or gs://)
    warm_start: bool = False  # start from the checkpoint of the model in production
    placement: TrainPlacement = TrainPlacement()


class EvaluateConfig(_Strict):
    min_images: int = Field(default=1, ge=1)  # fewer val images: evaluation fails
    missing_classes: Literal["fail", "warn"] = "fail"  # a class without val boxes


class ExportConfig(_Strict):
    input_type: Literal["image_tensor", "image_bytes", "tf_example"] = "image_tensor"


class ServingConfig(ServingOptions):
    base: str
    model_name: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # no '.', '..'


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
    export: ExportConfig = ExportConfig()
    serving: ServingConfig
    notify: dict[str, Any] = {}  # notifiers.build_notifiers; empty: no notifications

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True), indent=2)


_PATH_KEYS = ("runs", "datasets", "exports.ledger", "records.cache", "serving.models_config",
              "serving.registry", "exports.path", "exports.images_root", "train.model_config",
              "train.init_checkpoint", "serving.base")


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


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid pipeline config"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
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
    for key in ("runs", "datasets"):
        data.setdefault(key, PipelineConfig.model_fields[key].default)
    data.setdefault("exports", {}).setdefault("ledger", ExportsConfig.model_fields["ledger"].default)
    if isinstance(data.get("records", {}), dict):
        data.setdefault("records", {}).setdefault("cache", RecordsConfig.model_fields["cache"].default)
    for key in _PATH_KEYS:
        value = _get_dotted(data, key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            _set_dotted(data, key, str(home / value))
    return validate_config(data, str(path))


def read_frozen_config(path: str | Path) -> PipelineConfig:
    """Read the resolved config a run froze with `freeze_config`."""
    return validate_config(json.loads(storage.read_text(path)), str(path))


def freeze_config(config: PipelineConfig, out_dir: str | Path) -> str:
    target = Path(out_dir) / "pipeline.json"
    storage.write_text(target, config.to_json())
    return str(target)
