"""odapi_rollback: move TF Serving's `stable` label back to an earlier version, on demand.

Wiring only. Trigger it with a `reason` (recorded in the registry next to who and when); the
target defaults to the previous stable version. If a Serving is configured (pipeline
`serving.grpc_address` / `serving.rest_url`, or the `tf_serving_default` connection) the
label moves only once Serving answers with the target version. `odapi rollback` does the
same from a terminal, without Airflow.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, Param

from odapi_operators.assets import SERVED_MODEL
from odapi_operators.operators import ResolvePipelineConfigOperator, RollbackOperator

PIPELINE_CONFIG = os.environ.get(
    "ODAPI_PIPELINE_CONFIG",
    str(Path(__file__).resolve().parents[1] / "include" / "configs" / "pipeline.yaml"))

with DAG(
    dag_id="odapi_rollback",
    description="Roll the served model's `stable` label back to an earlier version",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["odapi"],
    params={
        "model": Param(None, type=["null", "string"],
                       description="Model name (default: the pipeline config's "
                                   "serving.model_name)"),
        "version": Param(None, type=["null", "integer"], minimum=1,
                         description="Version to make stable (default: the previous stable "
                                     "version)"),
        "reason": Param(type="string", minLength=1, pattern=r"\S",
                        description="Why roll back (required; recorded in the registry)"),
    },
) as dag:
    config = ResolvePipelineConfigOperator(task_id="resolve_config",
                                           pipeline_config=PIPELINE_CONFIG,
                                           param_keys={"model": "serving.model_name",
                                                       "version": "run.rollback_to",
                                                       "reason": "run.reason"})
    RollbackOperator(task_id="rollback", config=config.output["config"],
                     outlets=[SERVED_MODEL])
