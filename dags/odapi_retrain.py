"""odapi_retrain: new annotation export -> trained, evaluated, gated detector in TF Serving.

Wiring only: every task is an operator from `odapi_operators`. Paths travel through XCom,
configuration comes from one validated pipeline YAML ($ODAPI_PIPELINE_CONFIG, default
include/configs/pipeline.yaml) plus the params below, frozen per run.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import DAG, CronDataIntervalTimetable, Param, TaskGroup, TriggerRule

from odapi_operators.assets import DATASET_VERSION, SERVED_MODEL
from odapi_operators.operators import (BuildLabelMapOperator, EvaluateDetectorOperator,
                                       ExportSavedModelOperator, FetchImagesOperator,
                                       IngestAnnotationsOperator, PromotionGateOperator,
                                       PushToServingOperator, RegisterRunOperator,
                                       ResolvePipelineConfigOperator,
                                       SelectExportsOperator,
                                       TrainDetectorOperator, VerifyImagesOperator,
                                       WriteTFRecordsOperator, is_promoted)
from odapi_operators.sensors import AnnotationExportSensor

PIPELINE_CONFIG = os.environ.get(
    "ODAPI_PIPELINE_CONFIG",
    str(Path(__file__).resolve().parents[1] / "include" / "configs" / "pipeline.yaml"))

with DAG(
    dag_id="odapi_retrain",
    description="Retrain, evaluate, gate and push an object detector from new annotations",
    # Nightly; a data interval (not a zero-length trigger) so a backfill run consumes exactly
    # the exports that landed in its interval.
    schedule=CronDataIntervalTimetable("0 3 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["odapi"],
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1)},
    params={
        "take_exports": Param("new", enum=["new", "all"],
                              description="new: exports no run consumed yet; all: retrain on "
                                          "every complete export"),
        "export_path": Param(None, type=["null", "string"],
                             description="Export folder to read instead of the configured one"),
        "train_steps": Param(None, type=["null", "integer"], minimum=1,
                             description="Training steps (default: the pipeline config's)"),
        "min_ap50": Param(None, type=["null", "number"], minimum=0, maximum=1,
                          description="Promote only at or above this AP50"),
        "force_promote": Param(False, type="boolean",
                               description="Promote even if the gate says no (needs a reason)"),
        "force_reason": Param(None, type=["null", "string"],
                              description="Why the promotion is forced (recorded)"),
    },
) as dag:
    config = ResolvePipelineConfigOperator(
        task_id="resolve_config", pipeline_config=PIPELINE_CONFIG,
        param_keys={"export_path": "exports.path", "train_steps": "train.steps",
                    "min_ap50": "gate.min_ap50"})
    cfg = config.output["config"]

    wait = AnnotationExportSensor(task_id="wait_for_export", config=cfg, poke_interval=60,
                                  timeout=6 * 3600, mode="reschedule")
    select = SelectExportsOperator(task_id="select_exports", config=cfg,
                                   candidates=wait.output)

    with TaskGroup("prepare", tooltip="annotations -> verified images -> TFRecords"):
        ingest = IngestAnnotationsOperator(task_id="ingest", config=cfg, exports=select.output,
                                           outlets=[DATASET_VERSION])
        fetch = FetchImagesOperator(task_id="fetch_images", config=cfg,
                                    manifest=ingest.output["manifest"])
        verify = VerifyImagesOperator(task_id="verify_images", config=cfg,
                                      manifest=fetch.output["manifest"])
        label_map = BuildLabelMapOperator(task_id="label_map", config=cfg,
                                          manifest=verify.output["manifest"])
        records = WriteTFRecordsOperator(task_id="write_tfrecords", config=cfg,
                                         manifest=verify.output["manifest"],
                                         label_map=label_map.output["label_map"])

    with TaskGroup("model", tooltip="train and evaluate"):
        train = TrainDetectorOperator(task_id="train", config=cfg,
                                      data=records.output["data"], pool="default_pool")
        evaluate = EvaluateDetectorOperator(task_id="evaluate", config=cfg,
                                            model_dir=train.output["model_dir"],
                                            data=records.output["data"])

    with TaskGroup("promote", tooltip="gate, export, push to TF Serving"):
        gate = PromotionGateOperator(task_id="gate", config=cfg,
                                     metrics=evaluate.output["metrics"],
                                     dataset_version=ingest.output["fingerprint"])
        promoted = ShortCircuitOperator(task_id="if_promoted", python_callable=is_promoted,
                                        op_args=[gate.output["promoted"]],
                                        # skip export/push, but let register_run (all_done) run
                                        ignore_downstream_trigger_rules=False)
        export = ExportSavedModelOperator(task_id="export", config=cfg,
                                          model_dir=train.output["model_dir"],
                                          data=records.output["data"],
                                          extras=[evaluate.output["metrics"],
                                                  gate.output["decision"]])
        push = PushToServingOperator(task_id="push", config=cfg,
                                     saved_model=export.output["saved_model"],
                                     outlets=[SERVED_MODEL])
        gate >> promoted >> export >> push

    register = RegisterRunOperator(task_id="register_run", config=cfg,
                                   trigger_rule=TriggerRule.ALL_DONE)
    [gate, push] >> register

    config >> wait
