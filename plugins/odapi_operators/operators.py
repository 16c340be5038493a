"""Airflow operators over the core stages: they translate context and XCom into core calls.

Every operator takes `config`, the path of the run's frozen pipeline config (the output of
`ResolvePipelineConfigOperator`), plus the upstream paths it needs; it returns a small dict of
paths and counts (one XCom per key), never data. Core modules are imported in `execute` so
that parsing a DAG file stays fast; TensorFlow stages run in a child process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from airflow.sdk import BaseOperator

from odapi_operators.core.layout import RunLayout, Stage


class OdapiStageOperator(BaseOperator):
    """Base for stage operators: resolves the frozen config and this run's stage folders."""

    template_fields: Sequence[str] = ("config",)
    ui_color = "#e8f0fe"

    def __init__(self, *, config: Any, **kwargs: Any) -> None:
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        self.config = config

    def pipeline(self):
        from odapi_operators.core.config import read_frozen_config

        return read_frozen_config(self.config)

    def stage_dir(self, context: Any, stage: Stage) -> Path:
        return RunLayout(Path(self.pipeline().runs), context["run_id"]).stage(stage)

    def publish(self, context: Any, **extra: Any) -> None:
        """Attach `extra` to the events of this task's outlet Assets."""
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = extra

    def run_child(self, args: list[str]) -> dict:
        from odapi_operators.core.stages.child import run_stage

        return run_stage(args, self.log.info)


class ResolvePipelineConfigOperator(BaseOperator):
    """Load and validate the pipeline YAML, apply DAG params, freeze it into the run folder.

    `param_keys` maps DAG param names to dotted config keys; a param left at None keeps the
    YAML's value.
    """

    template_fields: Sequence[str] = ("pipeline_config",)

    def __init__(self, *, pipeline_config: str, param_keys: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        self.pipeline_config = pipeline_config
        self.param_keys = param_keys or {}

    def execute(self, context: Any) -> dict:
        from odapi_operators.core.config import freeze_config, load_pipeline_config

        params = context.get("params") or {}
        check_params(params)
        overrides = {key: params.get(name) for name, key in self.param_keys.items()}
        config = load_pipeline_config(self.pipeline_config, overrides)
        layout = RunLayout(Path(config.runs), context["run_id"])
        path = freeze_config(config, layout.stage(Stage.CONFIG))
        self.log.info("pipeline config frozen at %s", path)
        return {"config": path, "run_dir": str(layout.root)}


def check_params(params: dict) -> None:
    """Refuse param combinations JSON schema cannot express, before any work is done."""
    from airflow.sdk.exceptions import AirflowFailException

    problems = []
    if params.get("force_promote") and not (params.get("force_reason") or "").strip():
        problems.append("force_promote needs a force_reason (it is recorded in decision.json)")
    if params.get("init_checkpoint") and params.get("warm_start"):
        problems.append("give init_checkpoint or warm_start, not both")
    if problems:
        raise AirflowFailException("invalid params: " + "; ".join(problems))


class SelectExportsOperator(OdapiStageOperator):
    """Pick the exports this run consumes, through the ledger (exactly once per export).

    A scheduled or manual run takes the complete exports no run consumed before (or all of
    them with the `take_exports: all` param); a backfill run takes those that landed in its
    data interval; a re-run takes what it took before. Nothing to take skips the rest.
    """

    template_fields = ("config", "candidates")

    def __init__(self, *, candidates: Any, **kwargs: Any) -> None:
        kwargs.setdefault("multiple_outputs", False)
        super().__init__(**kwargs)
        self.candidates = candidates

    def execute(self, context: Any) -> list[str]:
        from airflow.sdk.exceptions import AirflowSkipException

        from odapi_operators.core.data.ledger import select_exports

        exports = self.pipeline().exports
        dag_run = context["dag_run"]
        interval = None
        if str(dag_run.run_type).lower().endswith("backfill"):
            interval = (context["data_interval_start"], context["data_interval_end"])
        take_all = (context.get("params") or {}).get("take_exports") == "all"
        selected = select_exports(exports.ledger, context["run_id"], list(self.candidates or []),
                                  interval=interval, marker=exports.marker,
                                  take_all=take_all and interval is None)
        self.log.info("run consumes %d export(s)%s: %s", len(selected),
                      f" landed in {interval[0]} .. {interval[1]}" if interval else "", selected)
        if not selected:
            raise AirflowSkipException("no new complete export to consume")
        return selected


class IngestAnnotationsOperator(OdapiStageOperator):
    template_fields = ("config", "exports")

    def __init__(self, *, exports: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exports = exports

    def execute(self, context: Any) -> dict:
        from odapi_operators.core.data.ingest import ingest
        from odapi_operators.core.serving.serving_dir import production_label_map

        pipeline = self.pipeline()
        cfg = pipeline.exports
        summary = ingest(list(self.exports), self.stage_dir(context, Stage.INGEST),
                         images_root=cfg.images_root, fmt=cfg.format,
                         options=cfg.parser_options(),
                         label_map=production_label_map(pipeline.serving.base,
                                                        pipeline.serving.model_name),
                         unknown_classes=cfg.unknown_classes, datasets_dir=pipeline.datasets)
        self.log.info("ingested %(images)s images, %(boxes)s boxes, %(rejected)s rejected",
                      summary)
        for path in summary["ignored_files"]:
            self.log.warning("not an annotation or image file, ignored: %s", path)
        self.publish(context, fingerprint=summary["fingerprint"],
                     new_version=summary.get("new_version"), images=summary["images"],
                     boxes=summary["boxes"])
        return {k: summary[k] for k in ("manifest", "label_map", "rejections", "images", "boxes",
                                        "rejected", "fingerprint", "new_version")}


class FetchImagesOperator(OdapiStageOperator):
    template_fields = ("config", "manifest")

    def __init__(self, *, manifest: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.manifest = manifest

    def execute(self, context: Any) -> dict:
        from odapi_operators.core.data.fetch import fetch_images

        cfg = self.pipeline().images
        summary = fetch_images(self.manifest, self.stage_dir(context, Stage.IMAGES),
                               threads=cfg.threads, max_failed_share=cfg.max_failed_share,
                               policy=cfg.policy(), log=self.log.info)
        return {k: summary[k] for k in ("manifest", "failures", "ok", "failed", "skipped")}


class VerifyImagesOperator(FetchImagesOperator):
    """Decode every image (child process: its decoder pool needs a non-daemonic parent, which
    a Celery prefork worker is not)."""

    def execute(self, context: Any) -> dict:
        cfg = self.pipeline().images
        args = ["verify", "--manifest", str(self.manifest),
                "--out", str(self.stage_dir(context, Stage.VERIFY)),
                "--max-failed-share", str(cfg.max_quarantined_share)]
        args += _options(max_side=cfg.max_side, workers=cfg.workers)
        summary = self.run_child(args)
        if summary["failed"]:
            self.log.warning("%(failed)s images quarantined (%(boxes_quarantined)s boxes); "
                             "see %(quarantine)s", summary)
        return {k: summary[k] for k in ("manifest", "quarantine", "ok", "failed",
                                        "boxes_quarantined", "skipped")}


def _options(**options: Any) -> list[str]:
    """`--name value` for every option that is set."""
    return [arg for name, value in options.items() if value is not None
            for arg in (f"--{name.replace('_', '-')}", str(value))]


class BuildLabelMapOperator(FetchImagesOperator):
    """Label map for this run; ids extend the production model's label map, never renumber."""

    def execute(self, context: Any) -> dict:
        from odapi_operators.core.data.label_map import build_label_map
        from odapi_operators.core.serving.serving_dir import production_label_map

        cfg = self.pipeline().serving
        previous = production_label_map(cfg.base, cfg.model_name)
        summary = build_label_map(self.manifest, self.stage_dir(context, Stage.LABEL_MAP),
                                  previous=previous)
        return {"label_map": summary["label_map"], "num_classes": len(summary["classes"])}


class WriteTFRecordsOperator(OdapiStageOperator):
    template_fields = ("config", "manifest", "label_map")

    def __init__(self, *, manifest: Any, label_map: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.manifest = manifest
        self.label_map = label_map

    def execute(self, context: Any) -> dict:
        cfg = self.pipeline().records
        out = self.stage_dir(context, Stage.RECORDS)
        pairs = {"split": cfg.split, "shards": cfg.shards}
        summary = self.run_child([  # child process: its writer pool needs a non-daemonic parent
            "shard", "--manifest", str(self.manifest), "--label-map", str(self.label_map),
            "--out", str(out), "--target-shard-mb", str(cfg.target_shard_mb),
            *_options(cache=cfg.cache, **{k: ",".join(f"{n}={v}" for n, v in d.items())
                                          for k, d in pairs.items() if d})])
        return {"data": str(out), **{f"{split}_images": s["images"]
                                     for split, s in summary["splits"].items()}}


class PlanShardsOperator(WriteTFRecordsOperator):
    """Shard layout for dynamic task mapping: a list with one dict per shard.

    Each dict carries the whole layout (`counts`, `fingerprint`), so the plan's own return
    value can be mapped over (Airflow maps only over a task's return value):
    `plan >> WriteShardOperator.partial(...).expand(shard=plan.output) >> FinishShardsOperator`
    spreads shards over workers (the records folder must be on storage they share).
    `WriteTFRecordsOperator` does the same in one task, with processes and a content cache.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("multiple_outputs", False)
        super().__init__(**kwargs)

    def execute(self, context: Any) -> list[dict]:
        from odapi_operators.core.data.shard import plan_shards

        cfg = self.pipeline().records
        plan = plan_shards(self.manifest, self.label_map, cfg.split, cfg.shards,
                           target_shard_bytes=cfg.target_shard_mb << 20)
        self.log.info("%d shards: %s", len(plan["shards"]), plan["counts"])
        return [{**shard, "counts": plan["counts"], "fingerprint": plan["fingerprint"]}
                for shard in plan["shards"]]


class WriteShardOperator(WriteTFRecordsOperator):
    """Write one shard of a plan (a mapped task instance); skips a shard already complete."""

    template_fields = ("config", "manifest", "label_map", "shard")

    def __init__(self, *, shard: Any, **kwargs: Any) -> None:
        kwargs.setdefault("multiple_outputs", False)
        super().__init__(**kwargs)
        self.shard = shard

    def execute(self, context: Any) -> dict:
        from odapi_operators.core.data.shard import write_shard

        cfg, shard = self.pipeline().records, self.shard
        return write_shard(self.manifest, self.label_map, self.stage_dir(context, Stage.RECORDS),
                           cfg.split, shard["split"], shard["index"], shard["count"],
                           counts=shard["counts"])


class FinishShardsOperator(WriteTFRecordsOperator):
    """After every mapped shard of `plan`: per-split stats, source ids and the summary."""

    template_fields = ("config", "manifest", "label_map", "plan")

    def __init__(self, *, plan: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = plan

    def execute(self, context: Any) -> dict:
        from odapi_operators.core.data.shard import finish_shards

        cfg, first = self.pipeline().records, self.plan[0]
        out = self.stage_dir(context, Stage.RECORDS)
        summary = finish_shards(self.manifest, self.label_map, out, cfg.split, first["counts"],
                                fingerprint=first["fingerprint"])
        return {"data": str(out), **{f"{split}_images": s["images"]
                                     for split, s in summary["splits"].items()}}


class TrainDetectorOperator(OdapiStageOperator):
    """Train in a child process (`odapi train --pipeline`); a retry resumes from the newest
    checkpoint. The same command runs in a pod when training is placed on Kubernetes."""

    template_fields = ("config", "data")

    def __init__(self, *, data: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data = data

    def execute(self, context: Any) -> dict:
        summary = self.run_child(train_command(str(self.config), str(self.data),
                                               context["run_id"]))
        self.log.info("trained to step %s (%s)", summary.get("steps"), summary.get("start"))
        return {"model_dir": summary["model_dir"], "checkpoint": summary["checkpoint"],
                "steps": summary["steps"]}


def train_command(config: Any, data: Any, run_id: Any) -> list:
    """`odapi` arguments of the train stage for one run (child process, Celery or pod);
    XComArgs and templates are kept as they are, for a pod's templated `arguments`."""
    return ["train", "--pipeline", config, "--data", data, "--run-id", run_id]


class EvaluateDetectorOperator(OdapiStageOperator):
    """COCO metrics of the candidate (child process): metrics.json, detections, ground truth."""

    template_fields = ("config", "model_dir", "data")

    def __init__(self, *, model_dir: Any, data: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir
        self.data = data

    def evaluate(self, model: str, out: Path) -> dict:
        cfg = self.pipeline().evaluate
        summary = self.run_child(["evaluate", "--model", model, "--data", str(self.data),
                                  "--out", str(out), "--min-images", str(cfg.min_images),
                                  "--missing-classes", cfg.missing_classes])
        self.log.info("%s: AP %s, AP50 %s on %s val images; per class: %s", model,
                      summary.get("AP"), summary.get("AP50"), summary.get("eval_images"),
                      summary.get("per_class"))
        return summary

    def execute(self, context: Any) -> dict:
        out = self.stage_dir(context, Stage.EVALUATE) / "candidate" / "metrics.json"
        summary = self.evaluate(str(self.model_dir), out)
        return {"metrics": summary["metrics"], "AP": summary.get("AP"),
                "AP50": summary.get("AP50")}


class EvaluateProductionOperator(EvaluateDetectorOperator):
    """Evaluate the SavedModel Serving answers with on this run's val split: the gate's
    baseline, measured like the candidate. Returns version None when nothing serves yet."""

    template_fields = ("config", "data")

    def __init__(self, *, data: Any, **kwargs: Any) -> None:
        super().__init__(model_dir=None, data=data, **kwargs)

    def execute(self, context: Any) -> dict:
        from odapi_operators.core.serving.serving_dir import model_dir, production_version

        cfg = self.pipeline().serving
        version = production_version(cfg.base, cfg.model_name, cfg)
        if version is None:
            self.log.info("no model in production yet: the gate applies the first-model rule")
            return {"version": None, "metrics": None}
        out = self.stage_dir(context, Stage.EVALUATE) / "production" / "metrics.json"
        summary = self.evaluate(f"{model_dir(cfg.base, cfg.model_name)}/{version}", out)
        return {"version": version, "metrics": summary["metrics"]}


def is_promoted(promoted: bool) -> bool:
    """Short-circuit condition for the tasks after the gate (export, push)."""
    return bool(promoted)


def is_rejected(promoted: bool) -> bool:
    """Short-circuit condition for the "not promoted" notification."""
    return not promoted


class NotifyOperator(BaseOperator):
    """Say in the log (and through its `on_success_callback` notifiers) that the candidate
    was not promoted, with the gate's reason and the report to read."""

    template_fields: Sequence[str] = ("reason", "report")

    def __init__(self, *, reason: Any, report: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reason, self.report = reason, report

    def execute(self, context: Any) -> None:
        self.log.warning("not promoted: %s; report: %s", self.reason, self.report)


class PromotionGateOperator(OdapiStageOperator):
    """Write decision.json; returns `promoted` for the short-circuit that guards export/push.

    The baseline is the version Serving answers with (stable, else newest). A forced
    promotion needs the `force_promote` param and a `force_reason`, both recorded.
    """

    template_fields = ("config", "metrics", "baseline_version", "baseline_metrics",
                       "dataset_version")

    def __init__(self, *, metrics: Any, baseline_version: Any = None,
                 baseline_metrics: Any = None, dataset_version: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics = metrics
        self.baseline_version = baseline_version
        self.baseline_metrics = baseline_metrics
        self.dataset_version = dataset_version

    def execute(self, context: Any) -> dict:
        from odapi_operators.core.evaluation.gate import gate

        pipeline = self.pipeline()
        params = context.get("params") or {}
        decision = gate(self.metrics, self.stage_dir(context, Stage.GATE), pipeline.gate,
                        baseline_version=self.baseline_version,
                        baseline_metrics=self.baseline_metrics,
                        dataset_version=self.dataset_version,
                        force=bool(params.get("force_promote")),
                        force_reason=params.get("force_reason"),
                        forced_by=getattr(context["dag_run"], "triggering_user_name", None))
        self.log.info("promoted: %s (%s)", decision["promoted"], decision["reason"])
        return {"promoted": decision["promoted"], "decision": decision["decision"],
                "reason": decision["reason"]}


class BuildReportOperator(OdapiStageOperator):
    """The run's HTML report (child process): candidate vs production metrics, per-class AP,
    loss curve, validation images with boxes, the gate's decision. Returns its path."""

    template_fields = ("config", "metrics", "baseline_metrics", "model_dir", "data", "decision")

    def __init__(self, *, metrics: Any, data: Any, model_dir: Any = None,
                 baseline_metrics: Any = None, decision: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics, self.baseline_metrics = metrics, baseline_metrics
        self.model_dir, self.data, self.decision = model_dir, data, decision

    def execute(self, context: Any) -> dict:
        out = RunLayout(Path(self.pipeline().runs), context["run_id"]).root / "report"
        args = ["report", "--eval", str(Path(self.metrics).parent), "--data", str(self.data),
                "--out", str(out), "--title", f"{context['dag'].dag_id} {context['run_id']}"]
        for flag, value in (("--model-dir", self.model_dir), ("--decision", self.decision),
                            ("--baseline-eval", self.baseline_metrics and
                             str(Path(self.baseline_metrics).parent))):
            if value:
                args += [flag, str(value)]
        summary = self.run_child(args)
        self.log.info("report: %s", summary["report"])
        return {"report": summary["report"]}


class ExportSavedModelOperator(EvaluateDetectorOperator):
    """Export and check a SavedModel (child process); `extras` ride along in assets.extra/."""

    template_fields = ("config", "model_dir", "data", "extras")

    def __init__(self, *, extras: Any = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extras = extras

    def execute(self, context: Any) -> dict:
        pipeline = self.pipeline()
        args = ["export", "--model-dir", str(self.model_dir), "--data", str(self.data),
                "--out", str(self.stage_dir(context, Stage.EXPORT)),
                "--input-type", pipeline.export.input_type,
                "--model-name", pipeline.serving.model_name]
        for path in [self.config, *self.extras]:
            args += ["--extra", str(path)]
        summary = self.run_child(args)
        self.log.info("export checked: %s", summary.get("check"))
        return {"saved_model": summary["saved_model"]}


class PushToServingOperator(OdapiStageOperator):
    """Publish the next Serving version, then move the `stable` label to it (two steps)."""

    template_fields = ("config", "saved_model")

    def __init__(self, *, saved_model: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saved_model = saved_model

    def execute(self, context: Any) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from odapi_operators.hooks import serving_args

        if (context.get("params") or {}).get("dry_run"):
            raise AirflowSkipException(f"dry run: {self.saved_model} was exported and checked, "
                                       "not pushed")
        cfg = self.pipeline().serving
        summary = self.run_child([
            "push", "--pipeline", str(self.config), "--saved-model", str(self.saved_model),
            "--run-id", context["run_id"], "--out", str(self.stage_dir(context, Stage.PUSH)),
            "--promote", *serving_args(cfg)])
        self.log.info("pushed %s version %s to %s; stable -> %s (Serving check: %s)",
                      summary["model_name"], summary["version"], summary["path"],
                      summary["stable"], summary["serving"])
        self.publish(context, model_name=summary["model_name"], version=summary["version"],
                     path=summary["path"])
        return {"version": summary["version"], "path": summary["path"]}


class RegisterRunOperator(OdapiStageOperator):
    """Append this run's candidate record to the model registry, whatever the run's outcome."""

    def execute(self, context: Any) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from odapi_operators.core.serving.registry import register_run

        if not self.config:  # all_done: it also runs after resolve_config failed
            raise AirflowSkipException("nothing to register: the run failed before its config "
                                       "was frozen")

        pipeline = self.pipeline()
        cfg = pipeline.serving
        run_dir = RunLayout(Path(pipeline.runs), context["run_id"]).root
        record = register_run(cfg.registry_path(cfg.base), run_dir, cfg.model_name,
                              context["run_id"])
        return {"registry": str(cfg.registry_path(cfg.base)),
                "decision": (record or {}).get("decision")}
