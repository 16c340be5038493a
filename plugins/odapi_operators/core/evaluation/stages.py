"""Evaluation stages, declared once: the promotion gate and the run's HTML report."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from odapi_operators.core.config import ReportConfig
from odapi_operators.core.evaluation.gate import GatePolicy
from odapi_operators.core.layout import Stage
from odapi_operators.core.stages.contract import Inputs, Result, StageContext, StageSpec

# --- gate ---------------------------------------------------------------------------------

class GateInputs(Inputs):
    metrics: str = Field(description="the candidate's metrics.json")
    baseline_version: int | None = Field(default=None, description="the production version "
                                         "(none: first model)")
    baseline_metrics: str | None = Field(default=None, description="the production model's "
                                         "metrics.json on the same split")
    dataset_version: str | None = Field(default=None, description="the dataset fingerprint")


class Decision(Result):
    log_format = "promoted: {promoted} ({reason})"

    promoted: bool
    decision: str
    reason: str


def gate(ctx: StageContext, inputs: GateInputs, options: GatePolicy) -> Decision:
    """Write decision.json. A forced promotion (`run.force_promote`) needs `run.reason`; both
    are recorded with who triggered the run."""
    from odapi_operators.core.evaluation.gate import gate as decide

    run = ctx.pipeline.run if ctx.pipeline else None
    return Decision(**decide(inputs.metrics, ctx.folder, options,
                             baseline_version=inputs.baseline_version,
                             baseline_metrics=inputs.baseline_metrics,
                             dataset_version=inputs.dataset_version,
                             force=bool(run and run.force_promote),
                             force_reason=run.reason if run else None,
                             forced_by=run.triggered_by if run else None))


GATE = StageSpec(name="gate", help="decide whether the candidate may replace production",
                 inputs=GateInputs, result=Decision, run=gate, section="gate",
                 folder=Stage.GATE)


# --- report -------------------------------------------------------------------------------

class ReportInputs(Inputs):
    metrics: str = Field(description="the candidate's metrics.json (detections and ground "
                                     "truth beside it)")
    data: str = Field(description="records folder")
    model_dir: str | None = Field(default=None, description="training model dir (loss curve)")
    baseline_metrics: str | None = Field(default=None, description="the production model's "
                                         "metrics.json on the same split")
    decision: str | None = Field(default=None, description="decision.json of the gate")
    title: str | None = Field(default=None, description="page title (default: the run id)")


class Report(Result):
    log_format = "report: {report}"

    report: str


def report(ctx: StageContext, inputs: ReportInputs, options: ReportConfig) -> Report:
    """One self-contained HTML page with its PNGs (the folder is replaced whole)."""
    from odapi_operators.core.evaluation.report import build_report

    baseline = inputs.baseline_metrics
    return Report(**build_report(ctx.folder, Path(inputs.metrics).parent, inputs.data,
                                 model_dir=inputs.model_dir,
                                 baseline_eval_dir=Path(baseline).parent if baseline else None,
                                 decision=inputs.decision, grid_images=options.grid_images,
                                 score_threshold=options.score_threshold,
                                 title=inputs.title or (f"odapi run {ctx.run_id}"
                                                        if ctx.run_id else None)))


REPORT = StageSpec(name="report", help="write a run's HTML report with its PNGs",
                   inputs=ReportInputs, result=Report, run=report, section="report",
                   folder=Stage.REPORT, process="child")

STAGES = (GATE, REPORT)
