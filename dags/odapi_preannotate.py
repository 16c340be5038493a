"""odapi_preannotate: a newly served model pre-annotates the next batch for the labelers.

Wiring only. Runs whenever a push (or a rollback) publishes the served-model Asset, or on
demand with the params below: the production version scores the unlabeled pool, active
learning picks the `top_k` most informative images (never one sent before, labeled already,
or a near-duplicate), and they are written as Prodigy or Label Studio tasks under
`out_dir/<run id>/`. Labels coming back land in the exports folder, which is also what
counts as "labeled already" by default: that is the loop.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, Param

from odapi_operators.assets import SERVED_MODEL
from odapi_operators.core.config import load_pipeline_config
from odapi_operators.operators import PreannotateOperator, ResolvePipelineConfigOperator

PIPELINE_CONFIG = os.environ.get(
    "ODAPI_PIPELINE_CONFIG",
    str(Path(__file__).resolve().parents[1] / "include" / "configs" / "pipeline.yaml"))
PIPELINE = load_pipeline_config(PIPELINE_CONFIG)
DEFAULTS = PIPELINE.preannotate  # every param starts at the pipeline config's value

with DAG(
    dag_id="odapi_preannotate",
    description="Pre-annotate unlabeled images with the served model; pick the next batch",
    schedule=[SERVED_MODEL],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["odapi"],
    params={
        "pool": Param(DEFAULTS.pool, type="string", minLength=1,
                      description="Unlabeled images: a folder, a gs:// prefix or a list file"),
        "format": Param(DEFAULTS.format, enum=["prodigy", "labelstudio"],
                        description="Task format to write"),
        "top_k": Param(DEFAULTS.top_k, type=["null", "integer"], minimum=1,
                       description="Images to send (null: the pipeline config's value)"),
        "score_threshold": Param(DEFAULTS.score_threshold, type="number", minimum=0, maximum=1,
                                 description="Lowest score of a proposed box"),
        "max_boxes": Param(DEFAULTS.max_boxes, type="integer", minimum=1,
                           description="Most proposed boxes per image"),
        "out_dir": Param(DEFAULTS.out_dir, type="string", minLength=1,
                         description="Batches go to <out_dir>/<run id>/; the sent ledger "
                                     "and download cache live here too"),
        "candidate": Param(DEFAULTS.candidate, type=["null", "string"],
                           description="A second model (e.g. a training model dir): its "
                                       "disagreements with production rank higher"),
        "labeled": Param(DEFAULTS.labeled or [PIPELINE.exports.path], type="array",
                         items={"type": "string"},
                         description="Manifests or exports whose images are labeled "
                                     "already (default: the exports folder)"),
    },
) as dag:
    config = ResolvePipelineConfigOperator(
        task_id="resolve_config", pipeline_config=PIPELINE_CONFIG,
        param_keys={name: f"preannotate.{name}" for name in
                    ("pool", "format", "top_k", "score_threshold", "max_boxes", "out_dir",
                     "candidate", "labeled")})
    PreannotateOperator(task_id="preannotate", config=config.output["config"])
