"""odapi_retrain: new annotation export -> trained, evaluated, gated detector in TF Serving.

Wiring only: every task is an operator from `odapi_operators`. Paths travel through XCom,
configuration comes from one validated pipeline YAML ($ODAPI_PIPELINE_CONFIG, default
include/configs/pipeline.yaml) plus the params below, frozen per run. Parsing reads the YAML
too (a cheap, TensorFlow-free load) for what must be known up front: where training runs,
notifications, the trigger form's defaults, and whether a promotion waits for a person's
approval (`promote.approval`) or goes through the canary label first (`promote.canary`).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import (
    DAG,
    AssetOrTimeSchedule,
    CronDataIntervalTimetable,
    Param,
    TaskGroup,
    TriggerRule,
)

from odapi_operators.assets import DATASET_VERSION, SERVED_MODEL, exports_asset
from odapi_operators.core.config import load_pipeline_config
from odapi_operators.notifiers import build_notifiers, deadline_alerts
from odapi_operators.operators import (
    BuildLabelMapOperator,
    BuildReportOperator,
    CanaryCheckOperator,
    EvaluateDetectorOperator,
    EvaluateProductionOperator,
    ExportSavedModelOperator,
    FetchImagesOperator,
    IngestAnnotationsOperator,
    NotifyOperator,
    PromotionGateOperator,
    PushToServingOperator,
    RegisterRunOperator,
    ResolvePipelineConfigOperator,
    SelectExportsOperator,
    VerifyImagesOperator,
    WriteTFRecordsOperator,
    is_promoted,
    is_rejected,
)
from odapi_operators.partitioned import partitioned_records
from odapi_operators.placement import train_task
from odapi_operators.sensors import AnnotationExportSensor

PROJECT = Path(__file__).resolve().parents[1]
PIPELINE_CONFIG = os.environ.get("ODAPI_PIPELINE_CONFIG",
                                 str(PROJECT / "include" / "configs" / "pipeline.yaml"))
PIPELINE = load_pipeline_config(PIPELINE_CONFIG)
MODEL_CONFIGS = sorted(Path(PIPELINE.train.model_config_path).parent.glob("*.yaml"))
# Nightly; a data interval (not a zero-length trigger) so a backfill run consumes exactly
# the exports that landed in its interval.
NIGHTLY = CronDataIntervalTimetable("0 3 * * *", timezone="UTC")
# ... and within seconds of a new complete export, announced by the exports asset's watcher.
EXPORTS = exports_asset(PIPELINE.exports)

with DAG(
    dag_id="odapi_retrain",
    description="Retrain, evaluate, gate and push an object detector from new annotations",
    schedule=AssetOrTimeSchedule(timetable=NIGHTLY, assets=EXPORTS) if EXPORTS else NIGHTLY,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["odapi"],
    deadline=deadline_alerts(PIPELINE.notify),  # notify.deadline_minutes; none by default
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1),
                  "on_failure_callback": build_notifiers(PIPELINE.notify, "failure")},
    params={
        "take_exports": Param("new", enum=["new", "all"],
                              description="new: exports no run consumed yet; all: retrain on "
                                          "every complete export"),
        "export_path": Param(None, type=["null", "string"],
                             description="Export folder to read instead of the configured one"),
        "model_config": Param(PIPELINE.train.model_config_path, type="string",
                              enum=[str(p) for p in MODEL_CONFIGS] or None,
                              values_display={str(p): p.stem for p in MODEL_CONFIGS},
                              description="TF-Vision model config (include/configs/models)"),
        "train_steps": Param(PIPELINE.train.steps, type="integer", minimum=1,
                             description="Training steps"),
        "init_checkpoint": Param(PIPELINE.train.init_checkpoint, type=["null", "string"],
                                 description="Start from this checkpoint (folder or prefix, "
                                             "local or gs://) instead of from scratch"),
        "warm_start": Param(PIPELINE.train.warm_start, type="boolean",
                            description="Continuous training: start from the weights of the "
                                        "model in production (off: from scratch)"),
        "warm_start_steps": Param(PIPELINE.train.warm_start_steps, type=["null", "integer"],
                                  minimum=1, description="Training steps of a warm start "
                                                         "(empty: train_steps)"),
        "min_ap50": Param(None, type=["null", "number"], minimum=0, maximum=1,
                          description="Promote only at or above this AP50"),
        "force_promote": Param(False, type="boolean",
                               description="Promote even if the gate says no (needs a reason)"),
        "force_reason": Param(None, type=["null", "string"],
                              description="Why the promotion is forced (recorded)"),
        "dry_run": Param(False, type="boolean",
                         description="Everything but the push: train, evaluate, gate, report "
                                     "and export, leaving TF Serving untouched"),
    },
) as dag:
    config = ResolvePipelineConfigOperator(
        task_id="resolve_config", pipeline_config=PIPELINE_CONFIG,
        param_keys={"export_path": "exports.path", "train_steps": "train.steps",
                    "model_config": "train.model_config",
                    "init_checkpoint": "train.init_checkpoint",
                    "warm_start": "train.warm_start",
                    "warm_start_steps": "train.warm_start_steps", "min_ap50": "gate.min_ap50",
                    "take_exports": "run.take_exports", "dry_run": "run.dry_run",
                    "force_promote": "run.force_promote", "force_reason": "run.reason"})
    cfg = config.output["config"]

    # The nightly run waits for an export; a run an export event (or a person) started looks
    # once, so one with nothing new ends in seconds.
    wait = AnnotationExportSensor(task_id="wait_for_export", config=cfg, poke_interval=60,
                                  timeout=6 * 3600, mode="reschedule",
                                  look_once_for=("asset_triggered", "manual"))
    select = SelectExportsOperator(task_id="select_exports", config=cfg,
                                   candidates=wait.output)

    with TaskGroup("prepare", tooltip="annotations -> verified images -> TFRecords"):
        ingest = IngestAnnotationsOperator(task_id="ingest", config=cfg, exports=select.output,
                                           outlets=[DATASET_VERSION])
        if PIPELINE.images.partitioned:  # mapped tasks per partition of the images
            label_map, records = partitioned_records(cfg, ingest.output["manifest"])
        else:
            fetch = FetchImagesOperator(task_id="fetch_images", config=cfg,
                                        manifest=ingest.output["manifest"])
            verify = VerifyImagesOperator(task_id="verify_images", config=cfg,
                                          manifest=fetch.output["manifest"])
            label_map = BuildLabelMapOperator(task_id="label_map", config=cfg,
                                              manifest=verify.output["manifest"])
            records = WriteTFRecordsOperator(task_id="write_tfrecords", config=cfg,
                                             manifest=verify.output["manifest"],
                                             label_map=label_map.output["label_map"])

    with TaskGroup("model", tooltip="train, evaluate candidate and production on one split"):
        train = train_task("train", config=cfg, data=records.output["data"],
                           placement=PIPELINE.train.placement)
        # Both on the same val images, sliced by the dataset version's diff: all, new, old.
        evaluate = EvaluateDetectorOperator(task_id="evaluate", config=cfg,
                                            model=train.output["model_dir"],
                                            data=records.output["data"],
                                            diff=ingest.output["diff"])
        production = EvaluateProductionOperator(task_id="evaluate_production", config=cfg,
                                                data=records.output["data"],
                                                diff=ingest.output["diff"])

    with TaskGroup("promote", tooltip="gate, report, export, push to TF Serving"):
        gate = PromotionGateOperator(task_id="gate", config=cfg,
                                     metrics=evaluate.output["metrics"],
                                     baseline_version=production.output["version"],
                                     baseline_metrics=production.output["metrics"],
                                     dataset_version=ingest.output["fingerprint"])
        report = BuildReportOperator(task_id="report", config=cfg,
                                     metrics=evaluate.output["metrics"],
                                     baseline_metrics=production.output["metrics"],
                                     model_dir=train.output["model_dir"],
                                     data=records.output["data"],
                                     decision=gate.output["decision"])
        promoted = ShortCircuitOperator(task_id="if_promoted", python_callable=is_promoted,
                                        op_args=[gate.output["promoted"]],
                                        # skip export/push, but let register_run (all_done) run
                                        ignore_downstream_trigger_rules=False)
        rejected = ShortCircuitOperator(task_id="if_not_promoted", python_callable=is_rejected,
                                        op_args=[gate.output["promoted"]],
                                        ignore_downstream_trigger_rules=False)
        NotifyOperator(task_id="not_promoted", reason=gate.output["reason"],
                       report=report.output["report"],
                       on_success_callback=build_notifiers(
                           PIPELINE.notify, "not_promoted",
                           reason="{{ ti.xcom_pull(task_ids='promote.gate', key='reason') }}"),
                       ).set_upstream([rejected, report])
        # Made by the evaluation (export.ahead) when it could: then only the extras are added.
        export = ExportSavedModelOperator(task_id="export", config=cfg,
                                          model_dir=train.output["model_dir"],
                                          data=records.output["data"],
                                          exported_ahead=evaluate.output["export_ahead"],
                                          extras=[evaluate.output["metrics"],
                                                  gate.output["decision"]])
        push = PushToServingOperator(task_id="push", config=cfg,
                                     saved_model=export.output["saved_model"],
                                     decision=gate.output["decision"],
                                     outlets=[SERVED_MODEL],
                                     on_success_callback=None if PIPELINE.promote.canary else
                                     build_notifiers(PIPELINE.notify, "promoted"))
        gate >> promoted >> export >> push
        if PIPELINE.promote.approval:  # a person chooses while the export runs
            from odapi_operators.approval import wire_approval

            wire_approval(promoted, push, decision=gate.output["decision"],
                          report=report.output["report"], notify=PIPELINE.notify,
                          timeout_hours=PIPELINE.promote.approval_timeout_hours)
        if PIPELINE.promote.canary:  # stable moves only after this
            canary = CanaryCheckOperator(task_id="canary_check", config=cfg,
                                         version=push.output["version"],
                                         data=records.output["data"],
                                         decision=gate.output["decision"],
                                         on_success_callback=build_notifiers(PIPELINE.notify,
                                                                             "promoted"))

    register = RegisterRunOperator(task_id="register_run", config=cfg,
                                   trigger_rule=TriggerRule.ALL_DONE)
    [gate, report, push] >> register
    if PIPELINE.promote.canary:
        canary >> register

    config >> wait
