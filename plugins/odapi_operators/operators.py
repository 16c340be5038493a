"""Airflow operators over the declared stages: one generic operator, named per stage.

`StageOperator` runs any stage of `core/stages/catalog.py` from the run's frozen config, the
run id and its inputs (XComArgs or templates, one keyword per declared input): in the
worker's process, or as `odapi stage run ...` in a child process for the TensorFlow and
process-pool stages. It returns the stage result's declared fields (one XCom each). Failures
the child reports as config, data or refused fail the task at once (a retry would fail the
same way); transient ones keep the task's retries. The named subclasses only say which stage.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Sequence

from airflow.sdk import BaseOperator

from odapi_operators.core.stages import catalog
from odapi_operators.core.stages.contract import StageSpec


class ResolvePipelineConfigOperator(BaseOperator):
    """Load and validate the pipeline YAML, apply DAG params, freeze it into the run folder.

    `param_keys` maps DAG param names to dotted config keys (a param left at None keeps the
    YAML's value); the run section records the Airflow run and every param as given, so
    `pipeline.json` replays the run. With no Serving address in the config, the
    `tf_serving_conn_id` connection's (if it exists) is frozen in.
    """

    template_fields: Sequence[str] = ("pipeline_config",)

    def __init__(self, *, pipeline_config: str, param_keys: dict[str, str] | None = None,
                 tf_serving_conn_id: str = "tf_serving_default", **kwargs: Any) -> None:
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        self.pipeline_config = pipeline_config
        self.param_keys = param_keys or {}
        self.tf_serving_conn_id = tf_serving_conn_id

    def run_overrides(self, context: Any) -> dict[str, Any]:
        """`run.*` keys from the Airflow run itself."""
        dag_run = context["dag_run"]
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        params = dict(context.get("params") or {})
        run_type = getattr(dag_run.run_type, "value", dag_run.run_type)  # an enum or a str
        return {"run.id": context["run_id"], "run.type": str(run_type).lower(),
                "run.data_interval_start": start.isoformat() if start else None,
                "run.data_interval_end": end.isoformat() if end else None,
                "run.triggered_by": getattr(dag_run, "triggering_user_name", None),
                "run.params": params}

    def execute(self, context: Any) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from odapi_operators.core.config import ConfigError, freeze_config, load_pipeline_config
        from odapi_operators.core.layout import RunLayout, Stage
        from odapi_operators.hooks import serving_addresses

        params = context.get("params") or {}
        overrides = {key: params.get(name) for name, key in self.param_keys.items()}
        overrides.update(self.run_overrides(context))
        try:
            config = load_pipeline_config(self.pipeline_config, overrides)
        except ConfigError as exc:  # a retry reads the same YAML and params
            raise AirflowFailException(str(exc)) from None
        live = serving_addresses(config.serving, self.tf_serving_conn_id)
        if live:
            config = config.model_copy(update={
                "serving": config.serving.model_copy(update=live)})
        layout = RunLayout(config.runs, context["run_id"])
        path = freeze_config(config, layout.stage(Stage.CONFIG))
        self.log.info("pipeline config frozen at %s", path)
        return {"config": path, "run_dir": str(layout.root)}


class StageOperator(BaseOperator):
    """Run the declared stage `stage` for this run (see the module docstring).

    :param config: the run's frozen pipeline config (`resolve_config`'s `config` output).
    :param inputs: the stage's declared inputs, as keywords (templated).
    """

    stage: ClassVar[str]
    ui_color = "#e8f0fe"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A named stage operator templates its inputs and takes them as keywords in its
        signature (Airflow's `partial()` / `expand()` check keywords against it)."""
        super().__init_subclass__(**kwargs)
        if "stage" not in cls.__dict__:
            return
        names = list(catalog.get(cls.stage).inputs.model_fields)
        cls.template_fields = ("config", *names)

        def __init__(self: StageOperator, **kwargs: Any) -> None:
            super(cls, self).__init__(**kwargs)

        keyword = inspect.Parameter.KEYWORD_ONLY
        __init__.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("config", keyword),
            *(inspect.Parameter(name, keyword, default=None) for name in names),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
        cls.__init__ = __init__  # type: ignore[method-assign]

    def __init__(self, *, config: Any, **kwargs: Any) -> None:
        spec = self.spec()
        inputs = {name: kwargs.pop(name) for name in list(kwargs)
                  if name in spec.inputs.model_fields}
        kwargs.setdefault("multiple_outputs", spec.result.items is None)
        super().__init__(**kwargs)
        self.config = config
        for name in spec.inputs.model_fields:
            setattr(self, name, inputs.get(name, spec.inputs.model_fields[name].default))

    @classmethod
    def spec(cls) -> StageSpec:
        return catalog.get(cls.stage)

    def stage_inputs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.spec().inputs.model_fields}

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from odapi_operators.core.failures import StageSkipped, failure_of
        from odapi_operators.core.stages.runner import run_stage, run_stage_in_child

        spec = self.spec()
        call = dict(pipeline=str(self.config), run_id=context["run_id"],
                    inputs=self.stage_inputs(), log=self.log.info)
        try:
            result = (run_stage_in_child if spec.process == "child" else run_stage)(
                spec.name, **call)
        except StageSkipped as exc:
            raise AirflowSkipException(str(exc)) from None
        except Exception as exc:
            failure = failure_of(exc)
            if not failure.retryable:
                raise AirflowFailException(f"{spec.name} ({failure.value}, not retried): "
                                           f"{exc}") from exc
            raise
        self.log.info("%s", result.log_line())
        self.publish(context, result)
        contract = result.contract()
        return contract[result.items] if result.items else contract  # a list to map over

    def publish(self, context: Any, result: Any) -> None:
        """Attach `outlet_extra(result)` to the events of this task's outlet Assets."""
        extra = self.outlet_extra(result)
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = extra

    def outlet_extra(self, result: Any) -> dict:
        return result.contract()

    def on_kill(self) -> None:
        from odapi_operators.core.stages.child import terminate_children

        terminate_children()


class SelectExportsOperator(StageOperator):
    """The exports this run consumes (the ledger: exactly once per export); skips if none."""

    stage = "select_exports"


class IngestAnnotationsOperator(StageOperator):
    """Parse the selected exports into the run's manifest and dataset version."""

    stage = "ingest"


class FetchImagesOperator(StageOperator):
    """Bring every manifest image into the run's resumable image store."""

    stage = "fetch"


class VerifyImagesOperator(StageOperator):
    """Decode every image, normalize it, quarantine the bad ones (child process)."""

    stage = "verify"


class BuildLabelMapOperator(StageOperator):
    """The run's label map: ids extend production's, never renumbered."""

    stage = "label_map"


class WriteTFRecordsOperator(StageOperator):
    """Sharded TFRecords per split, in one task (child process)."""

    stage = "shard"


class PlanShardsOperator(StageOperator):
    """The shard plan as a list, to map `WriteShardOperator` over (`shard=plan.output`)."""

    stage = "plan_shards"


class WriteShardOperator(StageOperator):
    """Write one shard of the plan (a mapped task instance)."""

    stage = "write_shard"


class FinishShardsOperator(StageOperator):
    """Per-split stats and the records summary after every mapped shard."""

    stage = "finish_shards"


class PlanPartitionsOperator(StageOperator):
    """The manifest cut into partitions, a list to map `PreparePartitionOperator` and
    `ShardPartitionOperator` over (`partition=plan.output`)."""

    stage = "plan_partitions"


class PreparePartitionOperator(StageOperator):
    """Fetch and verify one partition (a mapped task instance; child process)."""

    stage = "prepare_partition"


class JoinPartitionsOperator(StageOperator):
    """The run's verified manifest from every prepared partition; the failure budgets."""

    stage = "join_partitions"


class ShardPartitionOperator(StageOperator):
    """Write one partition's shard of each split (a mapped task instance)."""

    stage = "shard_partition"


class FinishPartitionsOperator(StageOperator):
    """Per-split stats and the records summary after every partition's shards."""

    stage = "finish_partitions"


class TrainDetectorOperator(StageOperator):
    """Train in a child process; a retry resumes from the newest checkpoint."""

    stage = "train"


class EvaluateDetectorOperator(StageOperator):
    """COCO metrics of the candidate on the val split (child process)."""

    stage = "evaluate"


class EvaluateProductionOperator(StageOperator):
    """The production model on the same split: the gate's baseline."""

    stage = "evaluate_production"


class PromotionGateOperator(StageOperator):
    """Write decision.json; `promoted` guards export and push."""

    stage = "gate"


class BuildReportOperator(StageOperator):
    """The run's HTML report: metrics vs production, decision, loss, boxes."""

    stage = "report"


class ExportSavedModelOperator(StageOperator):
    """Export and check a SavedModel with warmup requests (child process)."""

    stage = "export"


class PushToServingOperator(StageOperator):
    stage = "push"

    def outlet_extra(self, result: Any) -> dict:
        return {"model_name": result.model_name, "version": result.version,
                "path": result.path}


class CanaryCheckOperator(StageOperator):
    """Check the canary against stable through Serving, then move stable (child process);
    a failed check fails the task, leaving stable where it was."""

    stage = "canary_check"


class RegisterRunOperator(StageOperator):
    """The run's candidate record in the model registry, whatever the run's outcome."""

    stage = "register_run"

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        if not self.config:  # all_done: it also runs after resolve_config failed
            raise AirflowSkipException("nothing to register: the run failed before its config "
                                       "was frozen")
        return super().execute(context)


class RollbackOperator(StageOperator):
    """Move `stable` back (run params `version`, `reason` in the frozen run section)."""

    stage = "rollback"

    def outlet_extra(self, result: Any) -> dict:
        return {"model_name": result.model_name, "version": result.version,
                "path": result.path, "action": "rollback"}


class PreannotateOperator(StageOperator):
    """The production model pre-annotates the pool; active learning picks the next batch.
    Skips when nothing is in production or the pool does not exist."""

    stage = "preannotate"


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
