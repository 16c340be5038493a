"""odapi_retrain's promote group alone, for the approval tests: resolve_config, the gate on a
metrics.json the test writes (no training), the approval wired by `wire_approval` as
odapi_retrain wires it, the push of a SavedModel folder the test writes, and register_run.

Files live beside $ODAPI_PIPELINE_CONFIG; $ODAPI_TEST_APPROVAL_HOURS is the answer timeout.
"""

from __future__ import annotations

import os

from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import DAG, Param, TaskGroup, TriggerRule

from odapi_operators.approval import wire_approval
from odapi_operators.operators import (
    PromotionGateOperator,
    PushToServingOperator,
    RegisterRunOperator,
    ResolvePipelineConfigOperator,
    is_promoted,
)

PIPELINE_CONFIG = os.environ["ODAPI_PIPELINE_CONFIG"]
HERE = os.path.dirname(PIPELINE_CONFIG)

with DAG(dag_id="odapi_approval_under_test", schedule=None,
         params={"force_promote": Param(False, type="boolean"),
                 "force_reason": Param(None, type=["null", "string"])}) as dag:
    config = ResolvePipelineConfigOperator(
        task_id="resolve_config", pipeline_config=PIPELINE_CONFIG,
        param_keys={"force_promote": "run.force_promote", "force_reason": "run.reason"})
    cfg = config.output["config"]
    with TaskGroup("promote"):
        gate = PromotionGateOperator(task_id="gate", config=cfg, metrics=f"{HERE}/metrics.json")
        promoted = ShortCircuitOperator(task_id="if_promoted", python_callable=is_promoted,
                                        op_args=[gate.output["promoted"]],
                                        ignore_downstream_trigger_rules=False)
        push = PushToServingOperator(task_id="push", config=cfg,
                                     saved_model=f"{HERE}/saved_model",
                                     decision=gate.output["decision"])
        gate >> promoted >> push
        wire_approval(promoted, push, decision=gate.output["decision"],
                      report=f"{HERE}/report.html",
                      timeout_hours=float(os.environ.get("ODAPI_TEST_APPROVAL_HOURS", "1")))
    register = RegisterRunOperator(task_id="register_run", config=cfg,
                                   trigger_rule=TriggerRule.ALL_DONE)
    [gate, push] >> register
