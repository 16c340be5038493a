"""Serving stages, declared once: push (and promote), register the run, roll back.

With a running TF Serving (the serving section's `grpc_address` / `rest_url`; in Airflow,
`resolve_config` fills them from the `tf_serving_default` connection) a label moves only once
Serving has the version AVAILABLE and answers with it; that check imports TensorFlow, so these
run in a child.
"""

from __future__ import annotations

import os

from pydantic import Field

from odapi_operators.core.config import ConfigError, PromoteConfig, ServingConfig
from odapi_operators.core.failures import StageSkipped
from odapi_operators.core.layout import RunLayout, Stage
from odapi_operators.core.stages.contract import Inputs, Result, StageContext, StageSpec
from odapi_operators.core.wording import setting

# --- push -----------------------------------------------------------------------------------

class PushInputs(Inputs):
    saved_model: str = Field(description="the checked SavedModel folder")
    promote: bool = Field(default=True, description="then move `stable` (or `canary`, see "
                          "decision) to the new version")
    decision: str | None = Field(default=None, description="the gate's decision.json: its "
                                 "approval says which label moves (stable, canary) or that "
                                 "nothing is pushed (reject); promote.canary: canary first")


class Pushed(Result):
    log_format = ("pushed {model_name} version {version} to {path}; {label} -> {version} "
                  "(Serving check: {serving})")

    model_name: str
    version: int
    path: str


def push(ctx: StageContext, inputs: PushInputs, options: ServingConfig) -> Pushed:
    """Publish the next Serving version, then move `stable` to it (two steps). A dry run
    (`run.dry_run`) stops before anything reaches Serving. A re-run returns the version it
    already pushed."""
    from odapi_operators.core.evaluation import decision as decision_file
    from odapi_operators.core.serving.publish import push_and_promote
    from odapi_operators.core.serving.push import push as push_version

    if ctx.pipeline is not None and ctx.pipeline.run.dry_run:
        raise StageSkipped(f"dry run: {inputs.saved_model} was exported and checked, not pushed")
    run_id = ctx.run_id or os.path.basename(os.path.dirname(inputs.saved_model.rstrip("/")))
    decision = decision_file.read(inputs.decision) if inputs.decision else {}
    canary_first = ctx.pipeline is not None and ctx.pipeline.promote.canary
    label = decision_file.label_to_move(decision, canary_first)
    approval = decision_file.approval_of(decision)
    if label is None:
        raise StageSkipped(f"not pushed: {approval.says() if approval else 'rejected'}")
    if canary_first and not (options.grpc_address or options.rest_url):
        raise ConfigError(f"{setting('promote.canary', True)} needs a running TF Serving to "
                          f"check the canary against: set {setting('serving.grpc_address')} "
                          f"or {setting('serving.rest_url')} (in Airflow: the "
                          "tf_serving_default connection); nothing was pushed")
    if inputs.promote:
        summary = push_and_promote(inputs.saved_model, options.base, options.model_name, run_id,
                                   options, out_dir=ctx.folder, label=label,
                                   reason=approval.says() if approval else None,
                                   by=approval.by if approval else None)
    else:
        summary = push_version(inputs.saved_model, options.base, options.model_name, run_id,
                               out_dir=ctx.folder, options=options)
    return Pushed(**summary)


PUSH = StageSpec(name="push", help="push a SavedModel as the next TF Serving version",
                 inputs=PushInputs, result=Pushed, run=push, section="serving",
                 folder=Stage.PUSH, process="child")


# --- canary_check ---------------------------------------------------------------------------

class CanaryInputs(Inputs):
    version: int | None = Field(default=None, description="the version labelled canary "
                                "(default: the one the canary label points at)")
    data: str | None = Field(default=None, description="records folder: val images to replay "
                             "beside the warmup requests")
    decision: str | None = Field(default=None, description="decision.json to record the "
                                 "verdict in; its approval says whether stable may move")


class CanaryChecked(Result):
    log_format = ("canary {version}: passed ({reason}); p95 {p95_ms} ms, agreement "
                  "{agreement}; stable -> {stable}")

    version: int
    passed: bool
    stable: int | None
    reason: str


def canary_check(ctx: StageContext, inputs: CanaryInputs,
                 options: PromoteConfig) -> CanaryChecked:
    """Replay warmup requests and val images against canary and stable through Serving; move
    stable only if the canary keeps to the latency budget and agrees with stable."""
    from odapi_operators.core.serving.canary import check_canary

    if ctx.pipeline is None:
        raise ValueError("canary_check needs the pipeline config (serving section)")
    examples: list[bytes] = []
    if inputs.data and options.canary_images:
        from odapi_operators.core.model.tfvision import val_examples

        examples = val_examples(inputs.data, ctx.pipeline.export.warmup_images
                                + options.canary_images)[ctx.pipeline.export.warmup_images:]
    serving = ctx.pipeline.serving
    verdict = check_canary(serving, serving.base, serving.model_name, inputs.version, examples,
                           options, decision_path=inputs.decision, log=ctx.log)
    return CanaryChecked(**verdict)


CANARY_CHECK = StageSpec(name="canary_check", help="check the canary version against stable "
                         "through TF Serving, then move stable (or remove the canary)",
                         inputs=CanaryInputs, result=CanaryChecked, run=canary_check,
                         section="promote", folder=Stage.CANARY, process="child")


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

STAGES = (PUSH, CANARY_CHECK, REGISTER_RUN, ROLLBACK)
