"""Operators that act on the served model: roll `stable` back, with TF Serving in the loop.

Like the stage operators they take `config` (the run's frozen pipeline config) and import
core code in `execute` only. If a Serving is configured (`serving.grpc_address` /
`serving.rest_url`, else the `tf_serving_default` connection) a label only moves once that
Serving has the target version AVAILABLE and answers a real request with it.
"""

from __future__ import annotations

from typing import Any

from odapi_operators.hooks import TFServingHook
from odapi_operators.operators import OdapiStageOperator


class RollbackOperator(OdapiStageOperator):
    """Move `stable` of `serving.model_name` back (core `rollback`) and record the reason.

    Reads the run's params: `version` (None: the previous stable version) and `reason`
    (required). Publishes the new stable version to this task's outlet Assets.
    """

    def __init__(self, *, tf_serving_conn_id: str = TFServingHook.default_conn_name,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tf_serving_conn_id = tf_serving_conn_id

    def execute(self, context: Any) -> dict:
        from odapi_operators.core.serving.serving_dir import model_dir
        from odapi_operators.hooks import serving_args

        params = context.get("params") or {}
        reason = (params.get("reason") or "").strip()
        if not reason:
            raise ValueError("a rollback needs a reason (param `reason`): it is recorded in "
                             "the registry")
        cfg = self.pipeline().serving
        args = ["rollback", "--model", cfg.model_name, "--reason", reason,
                "--serving-base", cfg.base,
                "--models-config", cfg.models_config_path(cfg.base),
                "--registry", cfg.registry_path(cfg.base),
                "--wait-available-s", str(cfg.wait_available_s),
                *serving_args(cfg, self.tf_serving_conn_id)]
        if params.get("version") is not None:
            args += ["--to", str(params["version"])]
        by = getattr(context["dag_run"], "triggering_user_name", None)
        if by:
            args += ["--by", by]
        result = self.run_child(args)  # the Serving check imports TensorFlow: not in the worker
        self.log.info("stable of %s: %s -> %s (%s)", cfg.model_name, result["previous"],
                      result["version"], reason)
        path = f"{model_dir(cfg.base, cfg.model_name)}/{result['version']}"
        self.publish(context, model_name=cfg.model_name, version=result["version"], path=path,
                     action="rollback")
        return {"version": result["version"], "previous": result["previous"], "path": path,
                "serving": result["serving"]}
