"""Serving stages, declared once: push (and promote), register the run, roll back.

With a running TF Serving (the serving section's `grpc_address` / `rest_url`; in Airflow,
`resolve_config` fills them from the `tf_serving_default` connection) a label moves only once
Serving has the version AVAILABLE and answers with it; that check imports TensorFlow, so these
run in a child.
"""

from __future__ import annotations

import os

from pydantic import Field

from odapi_operators.core.config import ServingConfig
from odapi_operators.core.failures import StageSkipped
from odapi_operators.core.layout import RunLayout, Stage
from odapi_operators.core.stages.contract import Inputs, Result, StageContext, StageSpec

# --- push -----------------------------------------------------------------------------------

class PushInputs(Inputs):
    saved_model: str = Field(description="the checked SavedModel folder")
    promote: bool = Field(default=True, description="then move `stable` to the new version")


class Pushed(Result):
    log_format = ("pushed {model_name} version {version} to {path}; stable -> {stable} "
                  "(Serving check: {serving})")

    model_name: str
    version: int
    path: str


def push(ctx: StageContext, inputs: PushInputs, options: ServingConfig) -> Pushed:
    """Publish the next Serving version, then move `stable` to it (two steps). A dry run
    (`run.dry_run`) stops before anything reaches Serving. A re-run returns the version it
    already pushed."""
    from odapi_operators.core.serving.publish import push_and_promote
    from odapi_operators.core.serving.push import push as push_version

    if ctx.pipeline is not None and ctx.pipeline.run.dry_run:
        raise StageSkipped(f"dry run: {inputs.saved_model} was exported and checked, not pushed")
    run_id = ctx.run_id or os.path.basename(os.path.dirname(inputs.saved_model.rstrip("/")))
    if inputs.promote:
        summary = push_and_promote(inputs.saved_model, options.base, options.model_name, run_id,
                                   options, out_dir=ctx.folder)
    else:
        summary = push_version(inputs.saved_model, options.base, options.model_name, run_id,
                               out_dir=ctx.folder, options=options)
    return Pushed(**summary)


PUSH = StageSpec(name="push", help="push a SavedModel as the next TF Serving version",
                 inputs=PushInputs, result=Pushed, run=push, section="serving",
                 folder=Stage.PUSH, process="child")


# --- register_run ---------------------------------------------------------------------------

class RunDirInput(Inputs):
    run_dir: str | None = Field(default=None, description="the run folder (default: the "
                                "run's, from the pipeline config and run id)")


class Registered(Result):
    registry: str
    decision: dict | None = None


def register_run(ctx: StageContext, inputs: RunDirInput, options: ServingConfig) -> Registered:
    """Append this run's candidate record to the model registry, whatever the outcome."""
    from odapi_operators.core.serving.registry import register_run as register

    run_dir = inputs.run_dir or (str(ctx.layout.root) if ctx.layout else None)
    if run_dir is None:
        raise ValueError("register_run: give the run folder, or a pipeline config and run id")
    path = options.registry_path(options.base)
    record = register(path, run_dir, options.model_name,
                      ctx.run_id or RunLayout.of(run_dir).root.name)
    return Registered(registry=path, decision=(record or {}).get("decision"))


REGISTER_RUN = StageSpec(name="register_run", help="append a run's record to the registry",
                         inputs=RunDirInput, result=Registered, run=register_run,
                         section="serving")


# --- rollback -------------------------------------------------------------------------------

class RolledBack(Result):
    log_format = "stable: {previous} -> {version}"

    model_name: str
    version: int
    previous: int | None
    path: str
    serving: dict | str | None = None


class RollbackInputs(Inputs):
    to: int | None = Field(default=None, description="version to make stable (default: the "
                           "previous stable version; run.rollback_to in a pipeline)")
    reason: str | None = Field(default=None, description="why (recorded in the registry; "
                               "run.reason in a pipeline)")
    by: str | None = Field(default=None, description="who (default: the run's triggering "
                           "user, else $USER)")


def rollback(ctx: StageContext, inputs: RollbackInputs, options: ServingConfig) -> RolledBack:
    """Move `stable` back and record who and why; reversible itself."""
    from odapi_operators.core.serving.publish import roll_back
    from odapi_operators.core.serving.serving_dir import model_dir

    run = ctx.pipeline.run if ctx.pipeline else None
    reason = (inputs.reason or (run.reason if run else None) or "").strip()
    if not reason:
        raise ValueError("a rollback needs a reason: it is recorded in the registry")
    to = inputs.to if inputs.to is not None else (run.rollback_to if run else None)
    by = (inputs.by or (run.triggered_by if run else None) or os.environ.get("USER")
          or os.environ.get("LOGNAME"))
    if ctx.pipeline is None:  # a terminal: keep the policy models.config already has
        from odapi_operators.core.serving import models_config

        current = models_config.read(options.models_config_path(options.base))
        options = models_config.current_policy(
            models_config.entry(current, options.model_name), options)
    result = roll_back(options.base, options.model_name, to, options, reason=reason, by=by)
    path = f"{model_dir(options.base, options.model_name)}/{result['version']}"
    return RolledBack(**result, path=path)


ROLLBACK = StageSpec(name="rollback", help="move the `stable` label back to an earlier version",
                     inputs=RollbackInputs, result=RolledBack, run=rollback, section="serving",
                     process="child")

STAGES = (PUSH, REGISTER_RUN, ROLLBACK)
